"""Rotary position embeddings in LLaMA's rotate-half convention (the HF LlamaModel layout GaLore uses)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, head_dim], computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rope_tables_at(
    positions: torch.Tensor, head_dim: int, theta: float, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin at the given positions only: shape positions.shape + [head_dim], computed in fp32 with the same
    operations as `rope_tables` (one fp32 product position * inverse frequency, then cos/sin), so the values equal
    rows `positions` of the full tables. A context-parallel rank needs only its own tokens' rows: building the
    tables of the whole sequence on every rank costs 2 x seq_len x head_dim fp32 words that do not shrink with cp."""
    device = positions.device if device is None else device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = positions.to(device=device, dtype=torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x: [B, H, T, D]. `positions` ([T] or [B, T]) selects table rows, so a sequence shard or a document reset
    can pass its own absolute positions; None means 0..T-1."""
    T = x.shape[-2]
    if positions is None:
        c, s = cos[:T], sin[:T]
    else:
        c, s = cos[positions], sin[positions]
        if c.dim() == 3:  # [B, T, D] -> broadcast over heads
            c, s = c.unsqueeze(1), s.unsqueeze(1)
    return (x.float() * c + _rotate_half(x.float()) * s).to(x.dtype)
