"""Per-group FP8 quantization with COAT's Dynamic Range Expansion: the exact reference every kernel must match.

Groups (`GroupLayout`). A group is a tile of at most 128 elements along the *last* dimension of the logical
tensor, so no tensor-parallel or sharded-data-parallel shard that splits rows (or splits the last dimension at
multiples of 128) ever splits a group, and states reshard exactly:

- last dim >= 128: every row is cut into 1 x 128 tiles; the last tile of a row is ragged when the row length is
  not a multiple of 128 (it holds `n_cols % 128` elements and is never merged with the next row);
- last dim < 128: a group is `128 // n_cols` whole rows (R x C tiles with C = n_cols); the last one may hold
  fewer rows. Shards along dim 0 must then be multiples of R rows.

Group g covers row block `g // groups_per_row` and column block `g % groups_per_row`; element i (0 <= i < R*C)
of the group is row `row_block * R + i // C`, column `col_block * C + i % C`, valid when both are in range.
Invalid (padding) positions count as zeros, which affect neither the maximum nor the nonzero minimum.

Quantization of one group x (FP32; every operation is an FP32 operation with IEEE round-to-nearest, except the
two marked f64, which are computed in float64 and rounded to FP32 once so that every libm and GPU agrees; sqrt is
the correctly rounded FP32 square root, `sqrt_rn` below):

    a = |x|;  mx = max a;  mn = min { a_i : a_i > 0 }
    mx == 0:            scale = 0, k = 1, centre = 1, codes 0
    mn == mx:           k = 1, centre = mx, scale = 2^-8, q = x / centre * 256   (exactly 0 or +-256)
    no expansion:       k = 1, centre = 1, scale = mx / FMAX, q = x / scale
    expansion:          R = mx / mn
                        k = floor(16 * log2(FMAX^2 / 2) / log2(R)) / 16   (f64; then clamped to [1, K_MAX])
                        centre = sqrt(mx) * sqrt(mn)   (two roots: no underflow for v ~ 1e-30)
                        scale = pow(mx / centre, k) / FMAX
                        q = sign(x) * pow(a / centre, k) / scale
    codes = fp8(clamp(q, -FMAX, FMAX))   (round to nearest even)

with pow(t, k) = t when k == 1, 0 when t == 0, else fp32(exp2(k * log2(t))) (f64). Dequantization:

    y = fp32(code) * scale;  x = sign(y) * (k == 1 ? |y| : pow(|y|, 1/k)) * centre
    with pow(y, 1/k) = fp32(exp2(log2(y) / k)) (f64).

k is a multiple of 1/16 (COAT's `expand_min = 16`); clamping k >= 1 and the two special cases close the released
kernel's gaps (k < 1 on huge ratios; k = inf and NaN on all-zero or constant groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

from megaeff.precision.fp8 import Fp8Format

GROUP_SIZE = 128
K_MAX = 32.0
CONSTANT_SCALE = 2.0**-8  # scale of a constant-magnitude group: codes are exactly +-256 (or 0)
META_FIELDS = 3  # per group: scale, k, centre (FP32), stored as a [n_groups, 3] tensor


@dataclass(frozen=True)
class GroupLayout:
    n_rows: int
    n_cols: int
    rows_per_group: int
    cols_per_group: int

    @classmethod
    def for_shape(cls, shape: Sequence[int], group_size: int = GROUP_SIZE) -> "GroupLayout":
        """From the *logical* (global) shape, never a shard's."""
        numel = math.prod(shape)
        n_cols = int(shape[-1]) if len(shape) else 1
        if numel == 0:
            raise ValueError("cannot lay out groups for an empty tensor")
        n_rows = numel // n_cols
        if n_cols >= group_size:
            return cls(n_rows, n_cols, 1, group_size)
        return cls(n_rows, n_cols, group_size // n_cols, n_cols)

    @property
    def groups_per_row(self) -> int:
        return -(-self.n_cols // self.cols_per_group)

    @property
    def row_blocks(self) -> int:
        return -(-self.n_rows // self.rows_per_group)

    @property
    def n_groups(self) -> int:
        return self.row_blocks * self.groups_per_row

    @property
    def group_width(self) -> int:
        return self.rows_per_group * self.cols_per_group

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """[n_groups, group_width] copy of a tensor shaped like the parameter, zero-padded (any dtype, FP8 too:
        bit pattern 0 is +0.0 in both formats)."""
        fp8 = x.dtype.itemsize == 1 and x.is_floating_point()
        raw = x.view(torch.uint8) if fp8 else x
        R, C = self.rows_per_group, self.cols_per_group
        x2 = raw.reshape(self.n_rows, self.n_cols)
        pad_rows = self.row_blocks * R - self.n_rows
        pad_cols = self.groups_per_row * C - self.n_cols
        if pad_rows or pad_cols:
            x2 = torch.nn.functional.pad(x2, (0, pad_cols, 0, pad_rows))
        tiles = x2.reshape(self.row_blocks, R, self.groups_per_row, C).permute(0, 2, 1, 3)
        out = tiles.reshape(self.n_groups, R * C)
        return out.view(x.dtype) if fp8 else out

    def from_groups(self, g: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_groups`: [n_rows, n_cols] without the padding (contiguous)."""
        fp8 = g.dtype.itemsize == 1 and g.is_floating_point()
        raw = g.view(torch.uint8) if fp8 else g
        R, C = self.rows_per_group, self.cols_per_group
        tiles = raw.reshape(self.row_blocks, self.groups_per_row, R, C).permute(0, 2, 1, 3)
        full = tiles.reshape(self.row_blocks * R, self.groups_per_row * C)
        out = full[: self.n_rows, : self.n_cols].contiguous()
        return out.view(g.dtype) if fp8 else out


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The contract's square root: the correctly rounded (IEEE round-to-nearest-even) FP32 square root of an FP32
    tensor, on any device: the float64 square root of the (exactly converted) FP32 value, rounded once to FP32.

    Why this is exact: for FP32 x with sqrt(x) in [2^e, 2^(e+1)), x is a multiple of 2^(2e-23) and the square of
    an FP32 rounding midpoint is an odd multiple of 2^(2e-48), so sqrt(x) is at least 2^(e-50) = 4 float64 ulps
    away from every midpoint. Any float64 root within 4 ulps therefore rounds to the same FP32 value as the exact
    one (for a correctly rounded float64 root this is the classical 53 >= 2 * 24 + 2 argument). torch's CPU
    float64 sqrt is within 1 ulp (not always correctly rounded: about 1.3% of results are 1 ulp off), CUDA's is
    correctly rounded. Checked against numpy's FP32 sqrt on all 2^32 inputs, and by
    tests/unit/test_fp8_group_quant.py with an exact test; 0 -> 0, -0 -> -0, inf -> inf, negative -> NaN.

    Not `torch.sqrt` on FP32: torch 2.13's CPU kernel for float32 is 1 ulp off for 17% of inputs, which made the
    reference disagree with every kernel (sqrtf, __fsqrt_rn and tl.sqrt_rn are correctly rounded)."""
    if x.dtype != torch.float32:
        raise TypeError(f"sqrt_rn takes FP32 tensors, got {x.dtype}")
    return torch.sqrt(x.double()).float()


def _pow(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """pow(t, k) for t >= 0 as specified above: FP32 result of a float64 exp2(k * log2 t); t == 0 gives 0."""
    k64 = k.double()
    p = torch.exp2(k64 * torch.log2(t.double())).float()
    p = torch.where(t > 0, p, torch.zeros_like(p))
    return torch.where(k == 1.0, t, p)


def _root(y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """pow(y, 1/k) for y >= 0: FP32 result of a float64 exp2(log2(y) / k); y == 0 gives 0."""
    r = torch.exp2(torch.log2(y.double()) / k.double()).float()
    r = torch.where(y > 0, r, torch.zeros_like(r))
    return torch.where(k == 1.0, y, r)


def expansion_exponent(ratio: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """k = floor(16 * log2(FMAX^2/2) / log2(R)) / 16, clamped to [1, K_MAX]; FP32 (exact: a multiple of 1/16)."""
    kf = torch.floor(16.0 * fmt.log2_target_range / torch.log2(ratio.double())) / 16.0
    return kf.clamp(1.0, K_MAX).float()


def quantize_groups(xg: torch.Tensor, fmt: Fp8Format, expand: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """xg: [G, W] FP32 groups (padding zeros). Returns (codes [G, W] in fmt.dtype, meta [G, 3] = scale, k, centre)."""
    xg = xg.float()
    a = xg.abs()
    mx = a.amax(dim=1)
    big = torch.tensor(float("inf"), dtype=a.dtype)
    mn = torch.where(a > 0, a, big).amin(dim=1)
    zero = mx == 0
    const = (~zero) & (mn == mx)
    one = torch.ones_like(mx)
    if expand:
        ratio = torch.where(zero | const, one, mx / torch.where(zero, one, mn))
        k = torch.where(zero | const, one, expansion_exponent(ratio, fmt))
        centre = torch.where(zero, one, torch.where(const, mx, sqrt_rn(mx) * sqrt_rn(torch.where(zero, one, mn))))
        ymax = _pow(torch.where(zero, one, mx / centre), k)
        scale = torch.where(
            zero, torch.zeros_like(mx), torch.where(const, torch.full_like(mx, CONSTANT_SCALE), ymax / fmt.max)
        )
    else:
        k = one.clone()
        centre = torch.where(const, mx, one)
        scale = torch.where(const, torch.full_like(mx, CONSTANT_SCALE), mx / fmt.max)
    kc, cc = k[:, None], centre[:, None]
    y = torch.sign(xg) * _pow(a / cc, kc.expand_as(a))
    safe_scale = torch.where(scale > 0, scale, one)[:, None]
    q = torch.where(zero[:, None], torch.zeros_like(y), y / safe_scale)
    codes = q.clamp(-fmt.max, fmt.max).to(fmt.dtype)
    return codes, torch.stack([scale, k, centre], dim=1)


def dequantize_groups(codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_groups`: FP32 [G, W]."""
    scale, k, centre = (meta[:, i : i + 1] for i in range(META_FIELDS))
    y = codes.float() * scale
    return torch.sign(y) * _root(y.abs(), k.expand_as(y)) * centre


def quantize(x: torch.Tensor, layout: GroupLayout, fmt: Fp8Format, expand: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a tensor shaped like its parameter: codes in the same shape, meta [n_groups, 3]."""
    codes_g, meta = quantize_groups(layout.to_groups(x.float()), fmt, expand)
    return layout.from_groups(codes_g).reshape(x.shape), meta


def dequantize(codes: torch.Tensor, meta: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """FP32 tensor shaped like `codes`."""
    return layout.from_groups(dequantize_groups(layout.to_groups(codes), meta)).reshape(codes.shape)


def shard_group_problem(
    shape: Sequence[int], logical_shape: Sequence[int], split: str, group_size: int = GROUP_SIZE
) -> str:
    """Why the FP8 groups of a tensor-parallel shard (`split`: rows | cols | support; anything else is not
    split) of a tensor of `logical_shape` would differ from the logical tensor's ('' when they are the same)."""
    if split not in ("rows", "cols", "support"):
        return ""
    logical = GroupLayout.for_shape(logical_shape, group_size)
    if split == "rows" and len(shape) >= 2 and math.prod(shape[:-1]) % logical.rows_per_group == 0:
        return ""
    if split == "cols" and logical.rows_per_group == 1 and shape[-1] % group_size == 0:
        return ""
    what = {"rows": "its rows", "cols": f"its {shape[-1]} columns", "support": "its sparse values"}[split]
    return (
        f"the {split}-split shard holds {what}, which do not tile into whole {group_size}-element groups of the "
        "logical tensor"
    )
