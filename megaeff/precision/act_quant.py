"""Activation quantizers of COAT's mixed-granularity FP8 flow (research note coat_fp8.md section 2).

- Per-tensor (inputs of linear layers, gradients): one FP32 scale = amax / FMAX, so the largest magnitude maps to
  the format's largest finite value; this is the granularity a tensor-core GEMM consumes.
- Per-group 1 x G along the last dimension (inputs of non-linear ops; COAT's G = 16): one scale per group, stored
  in BF16. The scale is rounded to BF16 *before* dividing, so dequantization uses exactly the divisor the codes
  were made with; COAT's kernel divides by the FP32 scale and stores the rounded one, a ~2^-8 relative error we
  do not copy. The rounding can push a group's maximum up to 2^-8 past FMAX; the explicit clamp of `to_fp8`
  saturates it (well inside the format's half step).

E4M3 for forward activations, E5M2 for gradients. Zero tensors and zero groups get scale 1 (codes 0), so
dequantization never divides or multiplies by 0/0.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from megaeff.precision.fp8 import Fp8Format, get_format, to_fp8

E4M3 = get_format("e4m3")
E5M2 = get_format("e5m2")
# Scales below this would make x / scale overflow FP32 on the tensor's largest element.
_MIN_SCALE = torch.finfo(torch.float32).tiny


class TensorQ(NamedTuple):
    codes: torch.Tensor  # FP8, the shape of the quantized tensor
    scale: torch.Tensor  # FP32 scalar (0-d)


class GroupQ(NamedTuple):
    codes: torch.Tensor  # FP8, the shape of the quantized tensor
    scales: torch.Tensor  # BF16, [..., ceil(last / G)]


# ---------------------------------------------------------------------------------------------------- per tensor
def tensor_scale(x: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    amax = x.detach().abs().amax().float()
    scale = (amax / fmt.max).clamp_min(_MIN_SCALE)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_tensor(x: torch.Tensor, fmt: Fp8Format) -> TensorQ:
    scale = tensor_scale(x, fmt)
    return TensorQ(to_fp8(x.detach().float() / scale, fmt), scale)


def dequantize_tensor(q: TensorQ, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.codes.float() * q.scale).to(dtype)


def fake_quantize_tensor(x: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """x rounded through per-tensor FP8 and back, in x's dtype (for gradients that are consumed at once)."""
    return dequantize_tensor(quantize_tensor(x, fmt), x.dtype)


# ---------------------------------------------------------------------------------------------------- per group
def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as [..., n_groups, group] (the ragged last group zero-padded; zeros change no group maximum)."""
    pad = -x.shape[-1] % group
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def quantize_groups(x: torch.Tensor, fmt: Fp8Format, group: int) -> GroupQ:
    if group < 1:
        raise ValueError(f"group size must be >= 1, got {group}")
    xf = x.detach().float()
    g = _grouped(xf, group)
    amax = g.abs().amax(-1, keepdim=True)
    scales = (amax / fmt.max).to(torch.bfloat16)  # storage dtype, rounded once, before it is used
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = to_fp8(g / scales.float(), fmt)
    codes = codes.reshape(*g.shape[:-2], -1)[..., : x.shape[-1]]
    return GroupQ(codes.contiguous(), scales.squeeze(-1))


def dequantize_groups(q: GroupQ, group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = q.codes.shape[-1]
    g = _grouped(q.codes.float(), group) * q.scales.float().unsqueeze(-1)
    return g.reshape(*g.shape[:-2], -1)[..., :n].to(dtype)


# ---------------------------------------------------------------------------------------------------- sharing
_CACHE_ATTR = "_megaeff_fp8_tensor_q"


def _storage_owner(x: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor whose whole contiguous storage `x` spans (x itself or the base of a reshape view), else None."""
    base = x if x._base is None else x._base
    whole = base.is_contiguous() and x.is_contiguous() and x.numel() == base.numel()
    return base if whole and x.data_ptr() == base.data_ptr() else None


def quantize_tensor_shared(x: torch.Tensor, fmt: Fp8Format) -> TensorQ:
    """`quantize_tensor`, computed once per tensor value and reused by every consumer of the same tensor.

    q, k and v (and gate and up) take the same normed input; each saving its own FP8 copy would store it three
    times (COAT fuses QKV and saves one). Per-tensor codes do not depend on the shape, so they are memoized on
    the tensor that owns the storage (shared by reshape views), keyed by format and version counter: an in-place
    change invalidates it, and the memo dies with the tensor. No state outlives the activation it describes."""
    owner = _storage_owner(x)
    if owner is None:
        return quantize_tensor(x, fmt)
    hit = getattr(owner, _CACHE_ATTR, None)
    if hit is not None and hit[0] == fmt.name and hit[1] == owner._version:
        codes, scale = hit[2], hit[3]
    else:
        q = quantize_tensor(owner, fmt)
        codes, scale = q.codes.reshape(-1), q.scale
        setattr(owner, _CACHE_ATTR, (fmt.name, owner._version, codes, scale))
    return TensorQ(codes.view(x.shape), scale)
