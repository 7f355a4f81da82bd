"""COAT's FP8 activation flow as an activation policy (megaeff/layers/ops.py) plus the autograd Functions it uses.

Each Function computes its forward exactly as the high-precision op does (same ops, same dtype, autocast
included) and differs only in what it saves for backward (research note coat_fp8.md 2.3-2.4):

- linear (`Fp8SavedLinear`): the input in per-tensor E4M3; the weight is referenced, never copied. Backward
  quantizes the incoming gradient per-tensor to E5M2 and runs dX = dY W and dW = dY^T X on dequantized values.
- every projection matmul with `fp8_gemm` (`Fp8GemmLinear`, megaeff/precision/fp8_gemm_linear.py): dense
  projections (`dense`), the factors of lowrank / SLTrain / LOST and LOST's channel block (`linear`), and the
  GEMMs with SLTrain's densified W (`mm`, `mm_input_grad`, `mm_weight_grad`): the forward GEMM and both
  backward GEMMs run as FP8 GEMMs (megaeff/precision/scaled_mm.py); a GEMM whose shape breaks CUDA's rules
  falls back to the same arithmetic on dequantized values and says why once. SLTrain's sparse products stay
  high precision.
- RMSNorm (`Fp8RMSNorm`): the input in 1 x G E4M3 plus the FP32 rstd per row; backward recomputes x_hat.
- SwiGLU product (`Fp8SwiGLU`): gate and up in 1 x G E4M3; backward recomputes silu.
- SiLU inside a method (`Fp8SiLU`, LOST's f): the input in 1 x G E4M3.

Everything the policy is not asked for (residual adds, RoPE, SDPA, embedding, final norm, head, loss) stays high
precision because those modules never receive the policy.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from megaeff.errors import ConfigError
from megaeff.layers.ops import HIGH_PRECISION, ActivationOps, Packed
from megaeff.layers.sltrain_ops import compute_dtype
from megaeff.precision.act_quant import (
    E4M3,
    E5M2,
    GroupQ,
    TensorQ,
    dequantize_groups,
    dequantize_tensor,
    fake_quantize_tensor,
    quantize_groups,
    quantize_tensor_shared,
)
from megaeff.precision.fp8_gemm_linear import (  # noqa: F401  (Fp8GemmFallback: re-exported, its old home)
    Fp8Gemm,
    Fp8GemmFallback,
    Fp8GemmLinear,
    gemm_out_dtype,
    quantize_grad,
)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


# ---------------------------------------------------------------------------------------------------- linear
class Fp8SavedLinear(torch.autograd.Function):
    """y = x W^T in high precision; x saved in per-tensor E4M3, dY quantized to E5M2 in backward."""

    @staticmethod
    def forward(ctx, x, weight):
        y = F.linear(x, weight)
        q = quantize_tensor_shared(x, E4M3)
        ctx.save_for_backward(q.codes, q.scale, weight)
        ctx.x_dtype, ctx.cdt = x.dtype, compute_dtype(x, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        codes, scale, weight = ctx.saved_tensors
        cdt = ctx.cdt
        dyq = fake_quantize_tensor(dy, E5M2).to(cdt)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (dyq @ weight.to(cdt)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x = dequantize_tensor(TensorQ(codes, scale), cdt)
            dw = (_rows(dyq).t() @ _rows(x)).to(weight.dtype)
        return dx, dw


# ---------------------------------------------------------------------------------------------------- non-linear
class Fp8RMSNorm(torch.autograd.Function):
    """x / rms(x) * g in fp32 (the high-precision formula); saves x in 1 x G E4M3 and rstd (FP32, one per row)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, group: int):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = (xf * rstd * weight.float()).to(x.dtype)
        q = quantize_groups(x, E4M3, group)
        ctx.save_for_backward(q.codes, q.scales, rstd, weight)
        ctx.group, ctx.x_dtype = group, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        codes, scales, rstd, weight = ctx.saved_tensors
        xhat = dequantize_groups(GroupQ(codes, scales), ctx.group) * rstd
        dyf = dy.float()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gw = dyf * weight.float()
            dx = (rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = _rows(dyf * xhat).sum(0).to(weight.dtype)
        return dx, dw, None, None


def _silu_parts(x: torch.Tensor):
    """(silu(x), silu'(x)) in fp32."""
    s = torch.sigmoid(x)
    return x * s, s * (1.0 + x * (1.0 - s))


class Fp8SwiGLU(torch.autograd.Function):
    """silu(gate) * up; saves gate and up in 1 x G E4M3 and recomputes silu in backward."""

    @staticmethod
    def forward(ctx, gate, up, group: int):
        out = F.silu(gate) * up
        gq, uq = quantize_groups(gate, E4M3, group), quantize_groups(up, E4M3, group)
        ctx.save_for_backward(gq.codes, gq.scales, uq.codes, uq.scales)
        ctx.group, ctx.dtypes = group, (gate.dtype, up.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        gc, gs, uc, us = ctx.saved_tensors
        g = dequantize_groups(GroupQ(gc, gs), ctx.group)
        u = dequantize_groups(GroupQ(uc, us), ctx.group)
        silu, dsilu = _silu_parts(g)
        dyf = dy.float()
        return (dyf * u * dsilu).to(ctx.dtypes[0]), (dyf * silu).to(ctx.dtypes[1]), None


class Fp8SiLU(torch.autograd.Function):
    """silu(x); saves x in 1 x G E4M3."""

    @staticmethod
    def forward(ctx, x, group: int):
        q = quantize_groups(x, E4M3, group)
        ctx.save_for_backward(q.codes, q.scales)
        ctx.group, ctx.x_dtype = group, x.dtype
        return F.silu(x)

    @staticmethod
    def backward(ctx, dy):
        codes, scales = ctx.saved_tensors
        _, dsilu = _silu_parts(dequantize_groups(GroupQ(codes, scales), ctx.group))
        return (dy.float() * dsilu).to(ctx.x_dtype), None


# ---------------------------------------------------------------------------------------------------- policy
class Fp8Activations(ActivationOps):
    """COAT's mixed-granularity FP8 activations (`activations`) and/or FP8 GEMMs in every projection matmul (`gemm`).

    The only state is the GEMM engine's (`gemms`): the GEMM counts and the fallback reasons already reported, so
    each is said once per model."""

    def __init__(self, group_size: int = 16, *, activations: bool = True, gemm: bool = False):
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"act group size must be a positive integer, got {group_size!r}")
        self.group_size, self.activations, self.fp8_gemm = group_size, bool(activations), bool(gemm)
        self.gemms = Fp8Gemm()

    @property
    def name(self) -> str:
        parts = [f"fp8 activations (1x{self.group_size} groups)"] if self.activations else []
        return " + ".join(parts + (["fp8 gemm"] if self.fp8_gemm else [])) or "high precision"

    # ------------------------------------------------------------ ops the layers call
    def linear(self, x, weight):
        if self.fp8_gemm:
            return Fp8GemmLinear.apply(x, weight, self)
        return Fp8SavedLinear.apply(x, weight) if self.activations else F.linear(x, weight)

    def dense(self, x, weight):
        return self.linear(x, weight)

    def silu(self, x):
        return Fp8SiLU.apply(x, self.group_size) if self.activations else F.silu(x)

    def swiglu(self, gate, up):
        return Fp8SwiGLU.apply(gate, up, self.group_size) if self.activations else super().swiglu(gate, up)

    def rmsnorm(self, x, weight, eps):
        return (
            Fp8RMSNorm.apply(x, weight, eps, self.group_size) if self.activations else super().rmsnorm(x, weight, eps)
        )

    # ------------------------------------------------------------ for custom autograd Functions (SLTrain)
    def pack(self, x):
        if not self.activations:
            return super().pack(x)
        q = quantize_tensor_shared(x, E4M3)
        return Packed((q.codes, q.scale), x.dtype)

    def unpack(self, tensors: Sequence[torch.Tensor], dtype):
        if not self.activations:
            return super().unpack(tensors, dtype)
        return dequantize_tensor(TensorQ(*tensors), dtype)

    def grad(self, dy):
        return fake_quantize_tensor(dy, E5M2) if self.activations else dy

    # ------------------------------------------------------------ GEMMs inside custom Functions (SLTrain densify)
    def mm(self, x, weight):
        if not self.fp8_gemm:
            return super().mm(x, weight)
        cdt = torch.promote_types(x.dtype, weight.dtype)  # autocast is off here: operands are in the compute dtype
        return self.gemms.forward(x, weight, gemm_out_dtype(cdt))[0].to(cdt)

    def mm_input_grad(self, dy, weight):
        if not self.fp8_gemm:
            return super().mm_input_grad(dy, weight)
        cdt = torch.promote_types(dy.dtype, weight.dtype)
        return self.gemms.input_grad(quantize_grad(dy), weight, gemm_out_dtype(cdt)).to(cdt)

    def mm_weight_grad(self, dy, x):
        if not self.fp8_gemm:
            return super().mm_weight_grad(dy, x)
        cdt = torch.promote_types(dy.dtype, x.dtype)
        return self.gemms.weight_grad(quantize_grad(dy), x, gemm_out_dtype(cdt)).to(cdt)

    def __repr__(self) -> str:
        return f"Fp8Activations(group_size={self.group_size}, activations={self.activations}, gemm={self.fp8_gemm})"


def activation_ops(precision) -> ActivationOps:
    """The activation policy `precision` (a PrecisionConfig) asks for; high precision unless an FP8 part is on."""
    if not (precision.fp8_activations or precision.fp8_gemm):
        return HIGH_PRECISION
    g = precision.act_group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or 128 % g:
        raise ConfigError(
            "precision.act_group_size", f"must be a positive integer dividing 128 (COAT uses 16), got {g!r}"
        )
    return Fp8Activations(g, activations=precision.fp8_activations, gemm=precision.fp8_gemm)
