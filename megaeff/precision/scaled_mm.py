"""FP8 GEMM through `torch._scaled_mm` with per-tensor FP32 scales, held to CUDA's rules on every device.

The CPU implementation accepts layouts and format pairs that cuBLASLt rejects (research note coat_fp8.md 6.2):
e5m2 x e5m2, a row-major B, any K and N. Code that only ran on CPU would then fail on the first GPU run, so
`scaled_mm` checks the CUDA rules itself and raises `Fp8GemmError` naming the violated one:

- A (M x K) row-major, B (K x N) column-major (B = W^T of a row-major W is free: `W.t()`);
- K and N multiples of 16 (M is free);
- FP8 operands, not both E5M2;
- scales FP32 with one element each (per-tensor);
- output BF16 or FP32.

`gemm_unsupported` returns the reason as text (or None) so that callers can fall back instead of raising.
"""

from __future__ import annotations

from typing import Optional

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float32)
ALIGN = 16


class Fp8GemmError(ValueError):
    """An FP8 GEMM whose operands CUDA's torch._scaled_mm would reject."""


def _row_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and (t.stride(0) == t.shape[1] or t.shape[0] <= 1)


def _col_major(t: torch.Tensor) -> bool:
    return t.stride(0) == 1 and (t.stride(1) == t.shape[0] or t.shape[1] <= 1)


def gemm_unsupported(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype
) -> Optional[str]:
    """Why `a @ b` cannot run as a CUDA FP8 GEMM, or None when it can."""
    if a.dim() != 2 or b.dim() != 2:
        return f"operands must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}"
    if a.shape[1] != b.shape[0]:
        return f"inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}"
    if a.dtype not in FP8_DTYPES or b.dtype not in FP8_DTYPES:
        return f"operands must be float8_e4m3fn or float8_e5m2, got {a.dtype} and {b.dtype}"
    if a.dtype == b.dtype == torch.float8_e5m2:
        return "e5m2 x e5m2 is not supported by cuBLASLt (one operand must be e4m3)"
    if not _row_major(a):
        return f"A must be row-major (contiguous), got strides {a.stride()} for shape {tuple(a.shape)}"
    if not _col_major(b):
        return (
            "B must be column-major (the transpose of a contiguous tensor), got strides "
            f"{b.stride()} for shape {tuple(b.shape)}"
        )
    k, n = a.shape[1], b.shape[1]
    if k % ALIGN:
        return f"K = {k} is not a multiple of {ALIGN}"
    if n % ALIGN:
        return f"N = {n} is not a multiple of {ALIGN}"
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if s.dtype != torch.float32 or s.numel() != 1:
            return f"{name} must be a per-tensor float32 scale (one element), got {s.dtype} with {s.numel()} elements"
    if out_dtype not in OUT_DTYPES:
        return f"out_dtype must be bfloat16 or float32, got {out_dtype}"
    return None


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) with FP32 accumulation, in `out_dtype`; raises `Fp8GemmError` where CUDA would."""
    reason = gemm_unsupported(a, b, scale_a, scale_b, out_dtype)
    if reason is not None:
        raise Fp8GemmError(f"FP8 GEMM {tuple(a.shape)} @ {tuple(b.shape)}: {reason}")
    return torch._scaled_mm(a, b, scale_a.reshape(()), scale_b.reshape(()), out_dtype=out_dtype)


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major (one copy unless it already is)."""
    return t if _col_major(t) else t.t().contiguous().t()
