"""COAT's FP8 GEMMs for every projection matmul: the GEMM engine (`Fp8Gemm`) and the autograd Function
(`Fp8GemmLinear`) that the FP8 policy (megaeff/precision/fp8_activations.py) runs for `ops.linear`/`ops.dense`.

One engine per policy runs the three GEMMs of a linear map y = x W^T with per-tensor FP32 scales
(megaeff/precision/scaled_mm.py holds CUDA's rules):

    forward       y  = x_e4m3  W_e4m3^T      (`forward`)
    input grad    dx = dY_e5m2 W_e4m3        (`input_grad`)
    weight grad   dW = dY_e5m2^T x_e4m3      (`weight_grad`)

E4M3 for forward operands, E5M2 for incoming gradients, as COAT does. The output dtype is the compute dtype a
high-precision F.linear would have (BF16 under BF16 autocast, else the promotion; FP32 for anything else), and
the accumulation is FP32 either way. A GEMM whose shape or layout breaks CUDA's rules (K or N not a multiple of
16, e.g. a rank-8 factor or LOST's few channels, or fewer than 16 tokens in a weight gradient) runs the same
arithmetic on dequantized values (an FP32 matmul of the FP8-rounded operands, so CPU, GPU and the fallback agree
on the numbers) and says why once per reason.

The engine counts the GEMMs it ran each way (`counts.fp8`: through torch._scaled_mm; `counts.fallback`), so a test
or a benchmark can see that the FP8 path was taken. The counts are per policy object, never module globals.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Union

import torch

from megaeff.layers.sltrain_ops import compute_dtype
from megaeff.precision.act_quant import E4M3, E5M2, TensorQ, quantize_tensor, quantize_tensor_shared
from megaeff.precision.scaled_mm import OUT_DTYPES, column_major, gemm_unsupported, scaled_mm


class Fp8GemmFallback(UserWarning):
    """An FP8 GEMM ran as a dequantized matmul because its shape or layout breaks CUDA's rules."""


@dataclass
class GemmCounts:
    fp8: int = 0  # GEMMs run by torch._scaled_mm
    fallback: int = 0  # GEMMs run as an FP32 matmul of the dequantized FP8 operands


def rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def gemm_out_dtype(cdt: torch.dtype) -> torch.dtype:
    """The FP8 GEMM's output dtype for compute dtype `cdt` (torch._scaled_mm writes BF16 or FP32 only)."""
    return cdt if cdt in OUT_DTYPES else torch.float32


def quantize_grad(dy: torch.Tensor) -> TensorQ:
    """An incoming gradient as the backward GEMMs consume it: 2-D, per-tensor E5M2, row-major codes (autograd may
    hand over a gradient in a transposed layout, which the quantization would keep; copying the 1-byte codes is
    cheaper than the fallback)."""
    q = quantize_tensor(rows(dy), E5M2)
    return TensorQ(q.codes.contiguous(), q.scale)


class Fp8Gemm:
    """Per-tensor FP8 GEMMs held to CUDA's rules, with a reported fallback and counts (see the module docstring)."""

    def __init__(self) -> None:
        self.counts = GemmCounts()
        self._reported: set = set()

    def run(self, a, b, scale_a, scale_b, out_dtype: torch.dtype) -> torch.Tensor:
        """(a * scale_a) @ (b * scale_b): A row-major, B column-major FP8 codes, FP32 per-tensor scales."""
        reason = gemm_unsupported(a, b, scale_a, scale_b, out_dtype)
        if reason is None:
            self.counts.fp8 += 1
            return scaled_mm(a, b, scale_a, scale_b, out_dtype)
        self.counts.fallback += 1
        if reason not in self._reported:
            self._reported.add(reason)
            warnings.warn(
                f"FP8 GEMM {tuple(a.shape)} @ {tuple(b.shape)} runs as a dequantized matmul: {reason}",
                Fp8GemmFallback,
                stacklevel=3,
            )
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype):
        """(x W^T with shape [..., N], x's E4M3 codes): x is quantized once per tensor value and shared with the
        other consumers of the same activation (q/k/v, gate/up), W per call."""
        xq = quantize_tensor_shared(x, E4M3)
        wq = quantize_tensor(weight, E4M3)
        # A row-major and B column-major whatever layout x and W came in (a copy of 1-byte codes at most).
        y = self.run(rows(xq.codes).contiguous(), column_major(wq.codes.t()), xq.scale, wq.scale, out_dtype)
        return y.reshape(*x.shape[:-1], weight.shape[0]), xq

    def input_grad(self, g: TensorQ, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """dY W as [T, K] (g: the 2-D E5M2 gradient of `quantize_grad`); W re-quantized to E4M3 here, so no FP8
        weight copy outlives the forward (COAT's weight_memory_efficient default)."""
        wq = quantize_tensor(weight, E4M3)
        return self.run(g.codes, column_major(wq.codes), g.scale, wq.scale, out_dtype)

    def weight_grad(self, g: TensorQ, x: Union[torch.Tensor, TensorQ], out_dtype: torch.dtype) -> torch.Tensor:
        """dY^T x as [N, K]; x is the forward's E4M3 codes (TensorQ) or a high-precision tensor to quantize."""
        xq = x if isinstance(x, TensorQ) else quantize_tensor(x, E4M3)
        return self.run(g.codes.t().contiguous(), column_major(rows(xq.codes)), g.scale, xq.scale, out_dtype)


class Fp8GemmLinear(torch.autograd.Function):
    """y = x W^T as an FP8 GEMM (x, W per-tensor E4M3); backward dX = dY_e5m2 W_e4m3, dW = dY_e5m2^T X_e4m3.

    `policy` is the FP8 policy whose `gemms` engine runs (and counts) the three GEMMs. Only x's codes are saved;
    W's are recomputed in backward, so no weight copy outlives the forward."""

    @staticmethod
    def forward(ctx, x, weight, policy):
        cdt = compute_dtype(x, weight)
        out_dtype = gemm_out_dtype(cdt)
        y, xq = policy.gemms.forward(x, weight, out_dtype)
        ctx.save_for_backward(xq.codes, xq.scale, weight)
        ctx.x_dtype, ctx.out_dtype, ctx.gemms = x.dtype, out_dtype, policy.gemms
        return y.to(cdt)

    @staticmethod
    def backward(ctx, dy):
        codes, scale, weight = ctx.saved_tensors
        gemms, out_dtype = ctx.gemms, ctx.out_dtype
        g = quantize_grad(dy)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = gemms.input_grad(g, weight, out_dtype)
            dx = dx.reshape(*dy.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = gemms.weight_grad(g, TensorQ(codes, scale), out_dtype).to(weight.dtype)
        return dx, dw, None
