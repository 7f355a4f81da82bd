"""The FP8 AdamW update contract and its exact torch reference.

Every implementation (this reference, the Triton kernel, the CPU C++ kernel, the fused CUDA kernel) performs,
per element of a parameter with FP8 moments, exactly this sequence of FP32 operations (no fused multiply-add,
IEEE round-to-nearest division and square root), with the per-tensor scalars of `StepScalars` given as FP32:

    m0 = dequantize(m codes, m meta);  v0 = dequantize(v codes, v meta)     (megaeff/precision/group_quant.py)
    m  = (beta1 * m0) + (one_minus_beta1 * g)
    v  = (beta2 * v0) + (one_minus_beta2 * (g * g))
    d  = (sqrt(v) / bias_correction2_sqrt) + eps
    p  = (p * decay) - (step_size * (m / d))
    m codes, m meta = quantize(m);  v codes, v meta = quantize(v)            (per group, after the update)

The parameter update uses the *unquantized* new moments (COAT, torchao): quantization error only reaches the
following steps. Scalars are computed once per tensor and step on the host in float64 and rounded to FP32, so
no implementation evaluates `pow` itself: decay = 1 - lr * weight_decay, step_size = lr / (1 - beta1^t),
bias_correction2_sqrt = sqrt(1 - beta2^t).

Square roots. The reference does not call `torch.sqrt` on FP32 tensors (torch 2.13's CPU float32 kernel is 1 ulp
off for 17% of inputs): it uses `group_quant.sqrt_rn`, the float64 root rounded once to FP32, which is correctly
rounded by construction (see there), so the reference *as shipped* is the IEEE contract on every device. The
kernels use sqrtf without fast-math (C++), __fsqrt_rn (CUDA) and tl.sqrt_rn (Triton), and are tested bit for bit
against this unpatched reference (tests/unit/test_fp8_adamw_kernels.py, tests/unit/test_fp8_adamw_triton.py).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace
from typing import Iterator, List

import torch

from megaeff.precision.fp8 import Fp8Format
from megaeff.precision.group_quant import GroupLayout, dequantize, quantize, sqrt_rn


def f32(x: float) -> float:
    """Round a Python float to the nearest FP32 value (kept as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True)
class StepScalars:
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    decay: float
    step_size: float
    bias_correction2_sqrt: float

    @classmethod
    def compute(
        cls, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int
    ) -> "StepScalars":
        if step < 1:
            raise ValueError(f"step counts from 1, got {step}")
        return cls(
            beta1=f32(beta1),
            one_minus_beta1=f32(1.0 - beta1),
            beta2=f32(beta2),
            one_minus_beta2=f32(1.0 - beta2),
            eps=f32(eps),
            decay=f32(1.0 - lr * weight_decay),
            step_size=f32(lr / (1.0 - beta1**step)),
            bias_correction2_sqrt=f32(math.sqrt(1.0 - beta2**step)),
        )


@dataclass
class Fp8Entry:
    """One parameter with FP8 moments, as every backend receives it. All tensors are contiguous and on the
    parameter's device; `param` and `grad` are FP32; codes are shaped like `param`; metas are [n_groups, 3]."""

    param: torch.Tensor
    grad: torch.Tensor
    m_codes: torch.Tensor
    m_meta: torch.Tensor
    v_codes: torch.Tensor
    v_meta: torch.Tensor
    layout: GroupLayout
    scalars: StepScalars
    m_fmt: Fp8Format
    v_fmt: Fp8Format
    expand: bool


def adamw_math(p, m0, v0, g, s: StepScalars):
    """The FP32 update of the contract, on dequantized (or FP32-stored) moments. Returns (p, m, v), new tensors.
    Every operation is an IEEE FP32 one; sqrt is the correctly rounded `sqrt_rn`, not torch.sqrt."""
    m = (m0 * s.beta1) + (g * s.one_minus_beta1)
    v = (v0 * s.beta2) + ((g * g) * s.one_minus_beta2)
    d = (sqrt_rn(v) / s.bias_correction2_sqrt) + s.eps
    p = (p * s.decay) - ((m / d) * s.step_size)
    return p, m, v


# Rows of whole groups updated at once: the reference's float64 and FP32 temporaries (a dozen per element) then
# cost about 100 MB per chunk instead of tens of bytes per parameter of the largest tensor (for LLaMA-7B's
# 32000 x 4096 embedding that was 8.6 GB at the optimizer's peak). Groups are independent, so the result is the
# same bit for bit.
CHUNK_ELEMENTS = 1 << 20


def row_chunks(e: Fp8Entry, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[Fp8Entry]:
    """`e` cut into entries of whole row blocks of at most about `chunk_elements` elements (views: an update
    of a chunk writes into `e`'s tensors)."""
    L = e.layout
    rows = max(1, chunk_elements // max(L.n_cols, 1)) // L.rows_per_group * L.rows_per_group
    rows = max(rows, L.rows_per_group)
    if rows >= L.n_rows:
        yield e
        return
    two_d = lambda t: t.view(L.n_rows, L.n_cols)  # noqa: E731
    for r0 in range(0, L.n_rows, rows):
        r1 = min(r0 + rows, L.n_rows)
        g0 = (r0 // L.rows_per_group) * L.groups_per_row
        g1 = -(-r1 // L.rows_per_group) * L.groups_per_row
        yield replace(
            e,
            param=two_d(e.param)[r0:r1],
            grad=two_d(e.grad)[r0:r1],
            m_codes=two_d(e.m_codes)[r0:r1],
            v_codes=two_d(e.v_codes)[r0:r1],
            m_meta=e.m_meta[g0:g1],
            v_meta=e.v_meta[g0:g1],
            layout=GroupLayout(r1 - r0, L.n_cols, L.rows_per_group, L.cols_per_group),
        )


def reference_update(entries: List[Fp8Entry]) -> None:
    """In-place update of params, codes and metas; the exact reference for every kernel."""
    for e in (chunk for entry in entries for chunk in row_chunks(entry)):
        m0 = dequantize(e.m_codes, e.m_meta, e.layout)
        v0 = dequantize(e.v_codes, e.v_meta, e.layout)
        p, m, v = adamw_math(e.param, m0, v0, e.grad.float(), e.scalars)
        e.param.copy_(p)
        mc, mm = quantize(m, e.layout, e.m_fmt, e.expand)
        vc, vm = quantize(v, e.layout, e.v_fmt, e.expand)
        e.m_codes.copy_(mc)
        e.m_meta.copy_(mm)
        e.v_codes.copy_(vc)
        e.v_meta.copy_(vm)
