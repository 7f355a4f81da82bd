"""Attention backends behind one interface.

Layout: q [B, H, T, D], k and v [B, Hkv, S, D] with H a multiple of Hkv (grouped-query attention). Every
backend returns [B, H, T, D]. `forward_with_lse` also returns the log-sum-exp [B, H, T] of the scaled scores
(fp32, or float64 for float64 inputs), which context parallelism needs to merge partial results.

- `sdpa`: torch.nn.functional.scaled_dot_product_attention (fused kernels on GPU, default).
- `math`: explicit softmax accumulated in at least fp32; the exact reference, and the one that exposes the
  log-sum-exp on CPU.
- `flash`: flash-attn 2 on CUDA when the package is installed.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Tuple

import torch
import torch.nn.functional as F

from megaeff.errors import ConfigError


def _causal_mask(T: int, S: int, device) -> torch.Tensor:
    # Query i may see keys j <= i + (S - T): the last query row sees every key (bottom-right alignment).
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def build_mask(q, k, causal: bool, segment_ids) -> "torch.Tensor | None":
    """Boolean [T, S] or [B, 1, T, S] mask (True = may attend); None when nothing is masked.
    `segment_ids` [B, T] keeps attention inside each document of a packed sample (self-attention only)."""
    mask = _causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
    if segment_ids is not None:
        same = (segment_ids[:, :, None] == segment_ids[:, None, :]).unsqueeze(1)
        mask = same if mask is None else same & mask
    return mask


class MathAttention:
    name = "math"

    def forward_with_lse(self, q, k, v, causal: bool = True, segment_ids=None) -> Tuple[torch.Tensor, torch.Tensor]:
        H, Hkv = q.shape[1], k.shape[1]
        if H != Hkv:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32; float64 stays float64 for exact tests
        scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        mask = build_mask(q, k, causal, segment_ids)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        out = torch.matmul(probs, v.to(acc))
        return out.to(q.dtype), lse

    def __call__(self, q, k, v, causal: bool = True, segment_ids=None) -> torch.Tensor:
        return self.forward_with_lse(q, k, v, causal, segment_ids)[0]


class SdpaAttention:
    name = "sdpa"

    def __call__(self, q, k, v, causal: bool = True, segment_ids=None) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if segment_ids is not None or (causal and q.shape[2] != k.shape[2]):
            # SDPA's is_causal aligns top-left and knows no documents; pass the explicit mask instead.
            mask = build_mask(q, k, causal, segment_ids)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    def forward_with_lse(self, q, k, v, causal: bool = True, segment_ids=None):
        return MathAttention().forward_with_lse(q, k, v, causal, segment_ids)


class FlashAttention:
    name = "flash"

    def __init__(self) -> None:
        from flash_attn import flash_attn_func

        self._fn = flash_attn_func

    def _run(self, q, k, v, causal, with_lse, segment_ids=None):
        if segment_ids is not None:
            raise ConfigError(
                "data.reset_attention_mask", "flash attention here has no document masks; use sdpa or math"
            )
        # flash-attn wants [B, T, H, D]; it handles Hkv < H natively and aligns causal masks bottom-right.
        res = self._fn(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, return_attn_probs=with_lse
        )
        if with_lse:
            out, lse, _ = res
            return out.transpose(1, 2), lse.float()
        return res.transpose(1, 2)

    def __call__(self, q, k, v, causal: bool = True, segment_ids=None):
        return self._run(q, k, v, causal, False, segment_ids)

    def forward_with_lse(self, q, k, v, causal: bool = True, segment_ids=None):
        return self._run(q, k, v, causal, True, segment_ids)


def flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def select_attention(name: str, device: torch.device):
    """Resolve `model.attention_backend`; auto prefers flash-attn on CUDA, then SDPA."""
    if name == "auto":
        name = "flash" if device.type == "cuda" and flash_available() else "sdpa"
    if name == "flash":
        if not flash_available() or device.type != "cuda":
            raise ConfigError(
                "model.attention_backend", "flash needs CUDA and the flash-attn package (pip install 'megaeff[gpu]')"
            )
        return FlashAttention()
    if name == "sdpa":
        return SdpaAttention()
    if name == "math":
        return MathAttention()
    raise ConfigError("model.attention_backend", f"unknown backend {name!r}; available: auto, sdpa, math, flash")
