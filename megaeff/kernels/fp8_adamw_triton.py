"""Triton backend of the FP8 AdamW update (contract: megaeff/kernels/fp8_adamw_ref.py): one program per group.

Each program loads its group of param, grad and both moments' codes, runs the whole update and writes
everything back in place. The two moments travel side by side as the columns of [BLOCK, 2] tensors (tl.join),
so dequantization, the group reductions and requantization are written once for both, with the per-format
constants as [1, 2] tensors. The stages (decode, dequantize, group parameters, quantize, encode) are helper
device functions, each wrapped for both launch modes like the kernel (`_DeviceFunction`).

Numerics. Every FP32 division and square root is `div_rn` / `sqrt_rn` (Triton's plain `/` and `sqrt` on FP32
are approximate on NVIDIA GPUs), launches pass enable_fp_fusion=False (no FMA contraction), and the spec's
float64 steps run in tl.float64. FP8 codes never go through a Triton FP8 type: they are loaded and stored as
uint8 and decoded / encoded with integer bit manipulation (the algorithm of c10's casts, as in
csrc/fp8_adamw_math.h), because the interpreter's FP32 -> FP8 cast is wrong for a few percent of values
(triton#8322) and compiled Triton rejects float8e4nv below sm_89 (A100). The float64 constant
16 * log2(FMAX^2 / 2) enters as its bit pattern: a Python float literal in a kernel is typed FP32.

CPU tensors run in the Triton interpreter when TRITON_INTERPRET=1 (tests). The kernel is wrapped per launch
mode here rather than by @triton.jit at import, so the result does not depend on whether this module was
imported before or after the flag was set.
"""

from __future__ import annotations

import struct
from typing import List, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from megaeff.kernels.fp8_adamw_ref import Fp8Entry
from megaeff.precision.group_quant import CONSTANT_SCALE, GROUP_SIZE, K_MAX, META_FIELDS

E5M2 = {"e4m3": 0, "e5m2": 1}  # format name -> the kernel's *_E5 flag
# Globals a kernel reads must be constexprs.
N_SCALARS = tl.constexpr(8)
KMAX = tl.constexpr(K_MAX)
CONST_SCALE = tl.constexpr(CONSTANT_SCALE)


class _DeviceFunction(JITFunction):
    """A helper the kernel calls, usable in both launch modes whenever TRITON_INTERPRET was set: compiled, the
    code generator inlines it like any @triton.jit function (a JITFunction); interpreted, calling it runs the
    interpreter's rewrite of it, which is what @triton.jit returns when the flag is set at decoration time."""

    def __init__(self, fn) -> None:
        super().__init__(fn)
        self._interpreted = InterpretedFunction(fn)

    def __call__(self, *args, **kwargs):
        return self._interpreted(*args, **kwargs)


@_DeviceFunction
def _decode_fp8(code, e5, mbits, bias):
    """FP8 codes (int32) -> FP32. Codes 0x7F / 0xFF (E4M3) and exponent 31 (E5M2) are NaN / inf; a subnormal
    is an exact product."""
    ex = (code & 0x7F) >> mbits
    man = code & ((1 << mbits) - 1)
    mag = (((ex + 127 - bias) << 23) | (man << (23 - mbits))).to(tl.float32, bitcast=True)
    mag = tl.where(ex == 0, man.to(tl.float32) * tl.where(e5, 2.0**-16, 2.0**-9), mag)
    special = tl.where(e5, ex == 31, (code & 0x7F) == 0x7F)
    mag = tl.where(special, tl.where(e5 & (man == 0), float("inf"), float("nan")), mag)
    return tl.where((code & 0x80) != 0, -mag, mag)


@_DeviceFunction
def _dequantize(c, scale0, k0, centre0):
    """group_quant.dequantize_groups: sign(y) * root(|y|, k) * centre, with y = c * scale."""
    y = c * scale0
    ay = (y.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    root = tl.exp2(tl.log2(tl.where(ay > 0, ay, 1.0).to(tl.float64)) / k0.to(tl.float64)).to(tl.float32)
    root = tl.where(k0 == 1.0, ay, tl.where(ay > 0, root, 0.0))
    sign_y = tl.where(y > 0, 1.0, tl.where(y < 0, -1.0, tl.where(y == y, 0.0, y)))
    return (sign_y * root) * centre0


@_DeviceFunction
def _group_params(a, fmax, l16, EXPAND: tl.constexpr):
    """group_quant.quantize_groups' per-group (zero, k, centre, scale) from the magnitudes `a` ([BLOCK, 2],
    padding zero)."""
    # tl.reduce with the standard combine functions, not tl.max / tl.min: those are @triton.jit functions
    # decorated when triton.language was imported, unusable in the interpreter unless TRITON_INTERPRET was
    # already set then, while the interpreter's tl.reduce recognises these combine functions in either case.
    mx = tl.reduce(a, 0, tl.standard._elementwise_max)[None, :]
    mn = tl.reduce(tl.where(a > 0, a, float("inf")), 0, tl.standard._elementwise_min)[None, :]
    zero = mx == 0.0
    const = (~zero) & (mn == mx)
    safe_mn = tl.where(zero, 1.0, mn)
    if EXPAND:
        trivial = zero | const
        # 16 * L / log2(R) as torch evaluates a Python float over a tensor: reciprocal, then product.
        ratio = tl.where(trivial, 2.0, tl.div_rn(mx, safe_mn))
        kf = tl.floor((1.0 / tl.log2(ratio.to(tl.float64))) * l16) / 16.0
        k = tl.where(trivial, 1.0, tl.minimum(tl.maximum(kf, 1.0), KMAX).to(tl.float32))
        centre = tl.where(zero, 1.0, tl.where(const, mx, tl.sqrt_rn(mx) * tl.sqrt_rn(safe_mn)))
        t = tl.where(zero, 1.0, tl.div_rn(mx, centre))
        ymax = tl.exp2(k.to(tl.float64) * tl.log2(t.to(tl.float64))).to(tl.float32)
        ymax = tl.where(k == 1.0, t, ymax)
        scale = tl.where(zero, 0.0, tl.where(const, CONST_SCALE, tl.div_rn(ymax, fmax)))
    else:
        k = tl.full([1, 2], 1.0, tl.float32)
        centre = tl.where(const, mx, 1.0)
        scale = tl.where(const, CONST_SCALE, tl.div_rn(mx, fmax))
    return zero, k, centre, scale


@_DeviceFunction
def _quantize(x, a, zero, k, centre, scale, fmax):
    """group_quant.quantize_groups' values before encoding: sign(x) * (|x| / centre)^k / scale in [-FMAX, FMAX]."""
    tq = tl.div_rn(a, centre)
    pw = tl.exp2(k.to(tl.float64) * tl.log2(tl.where(tq > 0, tq, 1.0).to(tl.float64))).to(tl.float32)
    pw = tl.where(k == 1.0, tq, tl.where(tq > 0, pw, 0.0))
    sign_x = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, tl.where(x == x, 0.0, x)))
    q = tl.where(zero, 0.0, tl.div_rn(sign_x * pw, tl.where(scale > 0, scale, 1.0)))
    return tl.minimum(tl.maximum(q, -fmax, propagate_nan=tl.PropagateNan.ALL), fmax, propagate_nan=tl.PropagateNan.ALL)


@_DeviceFunction
def _encode_fp8(q, e5, mbits, bias, fmax):
    """Encode |q| <= FMAX round-to-nearest-even (int32 codes): below the smallest normal by an FP32 addition whose
    ulp is the FP8 subnormal step, above it by integer rounding of the FP32 bits (a carry moves into the exponent)."""
    u = q.to(tl.int32, bitcast=True)
    au = u & 0x7FFFFFFF
    magic = (128 - bias + 23 - mbits) << 23
    sub = (au.to(tl.float32, bitcast=True) + magic.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - magic
    odd = (au >> (23 - mbits)) & 1
    r = (au + (bias - 127) * (1 << 23) + ((1 << (22 - mbits)) - 1) + odd) >> (23 - mbits)
    r = tl.where(au < ((128 - bias) << 23), sub, r)
    r = tl.where(au >= fmax.to(tl.int32, bitcast=True), tl.where(e5, 0x7B, 0x7E), r)
    return tl.where(au > 0x7F800000, 0x7F, r) | ((u >> 24) & 0x80)


def _fp8_adamw_kernel(
    p_ptr,
    g_ptr,
    mc_ptr,
    mm_ptr,
    vc_ptr,
    vm_ptr,
    s_ptr,
    s_index,
    n_rows,
    n_cols,
    groups_per_row,
    R: tl.constexpr,
    C: tl.constexpr,
    M_E5: tl.constexpr,
    V_E5: tl.constexpr,
    M_L16: tl.constexpr,
    V_L16: tl.constexpr,
    EXPAND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    grp = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    row = (grp // groups_per_row) * R + i // C
    col = (grp % groups_per_row) * C + i % C
    mask = (i < R * C) & (row < n_rows) & (col < n_cols)
    off = row.to(tl.int64) * n_cols + col
    mask2 = mask[:, None]

    # Column 0 is m, column 1 is v.
    is_v = (tl.arange(0, 2) == 1)[None, :]
    e5 = tl.where(is_v, V_E5, M_E5) != 0
    mbits = tl.where(e5, 2, 3)
    bias = tl.where(e5, 15, 7)
    fmax = tl.where(e5, 57344.0, 448.0)
    l16 = tl.where(is_v, V_L16, M_L16).to(tl.int64).to(tl.float64, bitcast=True)

    s = s_ptr + s_index * N_SCALARS
    beta1, omb1, beta2, omb2 = tl.load(s), tl.load(s + 1), tl.load(s + 2), tl.load(s + 3)
    eps, decay, step_size, bc2 = tl.load(s + 4), tl.load(s + 5), tl.load(s + 6), tl.load(s + 7)
    mmeta, vmeta = mm_ptr + grp * 3, vm_ptr + grp * 3
    scale0 = tl.where(is_v, tl.load(vmeta), tl.load(mmeta))
    k0 = tl.where(is_v, tl.load(vmeta + 1), tl.load(mmeta + 1))
    centre0 = tl.where(is_v, tl.load(vmeta + 2), tl.load(mmeta + 2))

    code = tl.join(tl.load(mc_ptr + off, mask=mask, other=0), tl.load(vc_ptr + off, mask=mask, other=0)).to(tl.int32)
    m0, v0 = tl.split(_dequantize(_decode_fp8(code, e5, mbits, bias), scale0, k0, centre0))

    # fp8_adamw_ref.adamw_math, operation for operation.
    p = tl.load(p_ptr + off, mask=mask, other=0.0)
    g = tl.load(g_ptr + off, mask=mask, other=0.0)
    m = (m0 * beta1) + (g * omb1)
    v = (v0 * beta2) + ((g * g) * omb2)
    d = tl.div_rn(tl.sqrt_rn(v), bc2) + eps
    p = (p * decay) - (tl.div_rn(m, d) * step_size)
    tl.store(p_ptr + off, p, mask=mask)

    # group_quant.quantize_groups on the new moments; padding counts as zeros.
    x = tl.join(m, v)
    a = tl.where(mask2, (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.float32, bitcast=True), 0.0)
    zero, k, centre, scale = _group_params(a, fmax, l16, EXPAND)
    q = _quantize(x, a, zero, k, centre, scale, fmax)
    m_code, v_code = tl.split(_encode_fp8(q, e5, mbits, bias, fmax).to(tl.uint8))
    tl.store(mc_ptr + off, m_code, mask=mask)
    tl.store(vc_ptr + off, v_code, mask=mask)

    one = tl.arange(0, 1)
    ms, vs = tl.split(scale)
    mk, vk = tl.split(k)
    mcen, vcen = tl.split(centre)
    tl.store(mmeta + one, ms)
    tl.store(mmeta + 1 + one, mk)
    tl.store(mmeta + 2 + one, mcen)
    tl.store(vmeta + one, vs)
    tl.store(vmeta + 1 + one, vk)
    tl.store(vmeta + 2 + one, vcen)


# The same kernel for both launch modes, wrapped here instead of by @triton.jit (see the module docstring).
COMPILED = JITFunction(_fp8_adamw_kernel)
INTERPRETED = InterpretedFunction(_fp8_adamw_kernel)


def interpreting() -> bool:
    """TRITON_INTERPRET=1, read now (triton.knobs reads the environment on every access)."""
    return bool(triton.knobs.runtime.interpret)


def available(device) -> Tuple[bool, str]:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
        return True, ""
    if device.type == "cpu":
        if interpreting():
            return True, ""
        return False, "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1; slow, for tests)"
    return False, f"the Triton kernel updates CUDA tensors (or CPU ones in the interpreter), not {device.type} ones"


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _check(i: int, e: Fp8Entry) -> None:
    lay = e.layout
    n = lay.n_rows * lay.n_cols
    for name, fmt in (("m", e.m_fmt), ("v", e.v_fmt)):
        if fmt.name not in E5M2:
            raise ValueError(f"entry {i}: unsupported {name} format {fmt.name!r}")
        codes = getattr(e, f"{name}_codes")
        if codes.dtype != fmt.dtype:
            raise ValueError(f"entry {i}: {name}_codes is {codes.dtype}, {fmt.name} needs {fmt.dtype}")
        meta = getattr(e, f"{name}_meta")
        if tuple(meta.shape) != (lay.n_groups, META_FIELDS) or meta.dtype != torch.float32:
            raise ValueError(
                f"entry {i}: {name}_meta is {tuple(meta.shape)} {meta.dtype}, expected "
                f"({lay.n_groups}, {META_FIELDS}) float32"
            )
    for name in ("param", "grad", "m_codes", "v_codes", "m_meta", "v_meta"):
        t = getattr(e, name)
        if not t.is_contiguous() or t.device != e.param.device:
            raise ValueError(f"entry {i}: {name} must be contiguous and on {e.param.device}")
        if name in ("param", "grad", "m_codes", "v_codes") and t.numel() != n:
            raise ValueError(f"entry {i}: {name} has {t.numel()} elements, the layout {n}")
    if e.param.dtype != torch.float32 or e.grad.dtype != torch.float32:
        raise ValueError(f"entry {i}: param and grad must be float32, got {e.param.dtype} and {e.grad.dtype}")
    if lay.rows_per_group * lay.cols_per_group > GROUP_SIZE:
        raise ValueError(f"entry {i}: groups of {lay.rows_per_group}x{lay.cols_per_group} exceed {GROUP_SIZE}")


def update(entries: List[Fp8Entry]) -> None:
    """In place, like `reference_update`: one launch per entry (its group shape and formats are constexprs)."""
    for i, e in enumerate(entries):
        _check(i, e)
    by_device = {}
    for e in entries:
        by_device.setdefault(e.param.device, []).append(e)
    for device, group in by_device.items():
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(available(device)[1])
        kernel = INTERPRETED if interpreting() else COMPILED
        # The per-step scalars of all entries in one FP32 tensor: one host-to-device copy, and no Python float
        # kernel argument whose width would depend on the launch mode.
        scalars = torch.tensor(
            [
                [
                    e.scalars.beta1,
                    e.scalars.one_minus_beta1,
                    e.scalars.beta2,
                    e.scalars.one_minus_beta2,
                    e.scalars.eps,
                    e.scalars.decay,
                    e.scalars.step_size,
                    e.scalars.bias_correction2_sqrt,
                ]
                for e in group
            ],
            dtype=torch.float32,
        ).to(device)
        for j, e in enumerate(group):
            lay = e.layout
            kernel[(lay.n_groups,)](
                e.param,
                e.grad,
                e.m_codes.view(torch.uint8),
                e.m_meta,
                e.v_codes.view(torch.uint8),
                e.v_meta,
                scalars,
                j,
                lay.n_rows,
                lay.n_cols,
                lay.groups_per_row,
                R=lay.rows_per_group,
                C=lay.cols_per_group,
                M_E5=E5M2[e.m_fmt.name],
                V_E5=E5M2[e.v_fmt.name],
                M_L16=_f64_bits(16.0 * e.m_fmt.log2_target_range),
                V_L16=_f64_bits(16.0 * e.v_fmt.log2_target_range),
                EXPAND=bool(e.expand),
                BLOCK=GROUP_SIZE,
                enable_fp_fusion=False,
            )
