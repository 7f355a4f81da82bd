"""The activation ops every layer computes with: the seam through which FP8 activation compression plugs in.

Layers never call `F.linear`, `F.silu` or the RMSNorm formula directly on activations; they call the
`ActivationOps` object they were built with (`build_llama(..., act=ops)` -> `build_linear(..., act=ops)` ->
each layer's `ops`). The base class here is today's high-precision computation, op for op, so a model built
without an explicit policy is bit-identical to one built before this seam existed. A subclass changes only
what is *saved for backward* (and, optionally, the GEMM arithmetic), e.g. `megaeff.precision.fp8_activations.
Fp8Activations`; no layer code changes and there is no global switch.

Every matmul of a projection goes through `linear` (a factor of lowrank / SLTrain / LOST, LOST's channel block)
or `dense` (a full dense weight): with COAT's `fp8_gemm` both become FP8 GEMMs, which is why layers and their
tensor-parallel forms never call `torch._scaled_mm` themselves.

Custom autograd Functions of a method (SLTrain's densify and sparse products) save their activation input
through `pack`/`unpack` and filter incoming gradients through `grad`, so the same policy reaches them. A Function
that runs its own GEMMs (SLTrain's densify path) runs them through `mm`, `mm_input_grad` and `mm_weight_grad`,
so an FP8 policy can make them FP8 GEMMs; they are called with autocast off and operands in the compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F


class Packed(NamedTuple):
    """An activation as saved for backward: the tensors to hand to `ctx.save_for_backward` and the dtype the
    unpacked value must have."""

    tensors: Tuple[torch.Tensor, ...]
    dtype: torch.dtype


class ActivationOps:
    """High precision: exactly the ops the layers used before (the default policy, stateless)."""

    name = "high precision"

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x W^T for a matmul whose input is an activation (any projection, or a factor of one)."""
        return F.linear(x, weight)

    def dense(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x W^T of a full dense projection: the one place an FP8 GEMM may replace the matmul itself."""
        return self.linear(x, weight)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x / rms(x) * g in fp32 whatever the input dtype (as LLaMA does), cast back to the input dtype."""
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y * weight.float()).to(x.dtype)

    # ------------------------------------------------------------ for custom autograd Functions
    def pack(self, x: torch.Tensor) -> Packed:
        return Packed((x,), x.dtype)

    def unpack(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return tensors[0]

    def grad(self, dy: torch.Tensor) -> torch.Tensor:
        """The incoming gradient as the backward GEMMs should see it."""
        return dy

    def mm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x W^T inside a custom Function's forward (no autograd)."""
        return F.linear(x, weight)

    def mm_input_grad(self, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """dY W inside a custom Function's backward (dy 2-D)."""
        return dy @ weight

    def mm_weight_grad(self, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """dY^T x inside a custom Function's backward (dy and x 2-D)."""
        return dy.t() @ x

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


# Stateless, so one shared instance is safe.
HIGH_PRECISION = ActivationOps()


def resolve(ops) -> ActivationOps:
    return HIGH_PRECISION if ops is None else ops
