"""FP8 formats and the one rounding rule every implementation shares.

Casting to FP8 is round-to-nearest-even with *explicit* saturation at the format's largest finite value: CPU
torch saturates E4M3 but overflows E5M2 to inf, and CUDA's behaviour differs again, so values are clamped
before every cast and no implementation ever relies on the cast's own overflow handling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch


@dataclass(frozen=True)
class Fp8Format:
    name: str
    dtype: torch.dtype
    max: float  # largest finite value
    # Dynamic range expansion stretches a group's max/min ratio up to max^2 / 2 (COAT's 448^2/2 for E4M3): the
    # group maximum maps to `max` and the minimum to at least 2/max, a binade above the smallest subnormal.
    log2_target_range: float

    @property
    def code_bytes(self) -> int:
        return 1


def _fmt(name: str, dtype: torch.dtype) -> Fp8Format:
    fmax = float(torch.finfo(dtype).max)
    return Fp8Format(name, dtype, fmax, math.log2(fmax * fmax / 2.0))


FORMATS: Dict[str, Fp8Format] = {
    "e4m3": _fmt("e4m3", torch.float8_e4m3fn),
    "e5m2": _fmt("e5m2", torch.float8_e5m2),
}


def get_format(name: str) -> Fp8Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown FP8 format {name!r}; available: {', '.join(FORMATS)}") from None


def to_fp8(x: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of a float tensor to `fmt` (NaN stays NaN)."""
    return x.float().clamp(-fmt.max, fmt.max).to(fmt.dtype)


def round_to_fp8_grid(x: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """The FP32 value `to_fp8` would produce, as FP32 (fake quantization)."""
    return to_fp8(x, fmt).float()
