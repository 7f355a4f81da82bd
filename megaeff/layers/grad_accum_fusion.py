"""Gradient-accumulation fusion (`precision.grad_accum_fusion`): dense weight gradients summed in fp32 `main_grad`.

With bf16 weights (`precision.param_dtype=bf16`) autograd accumulates every micro-batch's weight gradient into
a bf16 `.grad`: each addition rounds the running sum to bf16's 8 significant bits, so with k micro-batches the
accumulated gradient carries up to k roundings of relative size 2^-9 each. Megatron-LM's
`gradient_accumulation_fusion` instead has the weight-gradient GEMM of each micro-batch accumulate straight into
an fp32 buffer, `param.main_grad`: one fp32 sum, no bf16 rounding, and no bf16 `.grad` at all.

`DenseWgradAccum` is that GEMM for `DenseLinear` (y = x W^T) and for the local GEMM of its tensor-parallel shard
(megaeff/distributed/tensor_parallel/base.py `DenseTP`, whose shard gradient is complete per rank): its
backward returns grad_input as the plain path does, adds dW = grad_output^T x into `weight.main_grad` (allocated
as fp32 zeros the first time) and returns None for the weight, so `weight.grad` stays None. The add is apex's
`fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32` (one cuBLAS GEMM with beta=1 into the fp32 buffer, bf16
operands) on CUDA where it is installed, else torch's `addmm_` of the operands cast to fp32 (the same sum; an fp32
GEMM is slower than a bf16 one on a GPU, which is why the apex kernel is preferred there). Then every hook
registered with `add_main_grad_hook` is called with the weight: the data-parallel reducer counts it ready, as a
post-accumulate-grad hook would for `.grad`.

The rest of the step reads `grad_of(p)`: `main_grad` where the parameter has one, else `.grad` (gradient norm and
clipping, the non-finite check through the norm, the per-parameter optimizer, the reducer's buckets).
`zero_main_grads` is what `zero_grad` does to `.grad`. Parameters other than the dense projections (norms,
embedding, head) keep autograd's `.grad`. Which configs this runs with is decided in
megaeff/config/optim.py (`validate_grad_accum_fusion`); what is not covered is refused there.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

from megaeff.layers import apex_ops
from megaeff.layers.ops import ActivationOps

MARK = "_megaeff_fused_wgrad"  # set on a weight whose gradient lives in `main_grad`
HOOKS = "_megaeff_main_grad_hooks"


def is_fused(p: torch.Tensor) -> bool:
    return bool(getattr(p, MARK, False))


def grad_of(p: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient the step uses: the fp32 `main_grad` of a fused weight, else `.grad` (None: no gradient)."""
    if is_fused(p):
        return getattr(p, "main_grad", None)
    return p.grad


def set_grad(p: torch.Tensor, value: Optional[torch.Tensor]) -> None:
    """Set what `grad_of(p)` returns."""
    if is_fused(p):
        p.main_grad = value
    else:
        p.grad = value


def zero_main_grads(params: Iterable[torch.Tensor], set_to_none: bool = True) -> None:
    """`zero_grad` for the fused weights' `main_grad` (the data-parallel reducer re-attaches and zeroes its views)."""
    for p in params:
        g = getattr(p, "main_grad", None) if is_fused(p) else None
        if g is None:
            continue
        if set_to_none:
            p.main_grad = None
        else:
            g.zero_()


def mark_fused(p: nn.Parameter) -> None:
    setattr(p, MARK, True)
    if not hasattr(p, "main_grad"):
        p.main_grad = None
    if not hasattr(p, HOOKS):
        setattr(p, HOOKS, [])


class _HookHandle:
    def __init__(self, hooks: List[Callable], fn: Callable):
        self.hooks, self.fn = hooks, fn

    def remove(self) -> None:
        if self.fn in self.hooks:
            self.hooks.remove(self.fn)


def add_main_grad_hook(p: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> _HookHandle:
    """Call `fn(p)` each time a backward has added into `p.main_grad` (what `register_post_accumulate_grad_hook`
    is for `.grad`: autograd never accumulates a fused weight's gradient, so its own hook would not run)."""
    hooks = getattr(p, HOOKS)
    hooks.append(fn)
    return _HookHandle(hooks, fn)


def wgrad_kernel_unavailable(x: torch.Tensor) -> Optional[str]:
    """Why apex's wgrad GEMM does not run for this input (None: it does)."""
    if not x.is_cuda:
        return "the input is not a CUDA tensor"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"input dtype {x.dtype} (apex's fp32-accumulating wgrad GEMM takes bf16/fp16)"
    if apex_ops.disabled():
        return f"{apex_ops.DISABLE_ENV} is set"
    status = apex_ops.apex_status()
    if not status.has("grad_accum_fusion"):
        return status.reason or status.parts.get("grad_accum_fusion", "apex has no fused_weight_gradient_mlp_cuda")
    return None


def accumulate_wgrad(main_grad: torch.Tensor, x2d: torch.Tensor, dy2d: torch.Tensor) -> str:
    """main_grad (out x in, fp32) += dy2d^T x2d, the sum in fp32; returns which path ran ("apex" | "torch")."""
    if wgrad_kernel_unavailable(x2d) is None:
        import fused_weight_gradient_mlp_cuda

        # Megatron-LM's call: (input [tokens, in], grad_output [tokens, out], main_grad [out, in]), contiguous.
        fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(x2d.contiguous(), dy2d.contiguous(), main_grad)
        return "apex"
    # bf16 -> fp32 is exact, so this is the fp32 GEMM of the very operands the bf16 path multiplies.
    main_grad.addmm_(dy2d.t().float(), x2d.float())
    return "torch"


class DenseWgradAccum(torch.autograd.Function):
    """y = x W^T with W's gradient accumulated into `W.main_grad` (module docstring). `x` is already in W's dtype
    (the layer casts it, as bf16 autocast would), so forward and grad_input are the plain bf16 path's GEMMs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.param = weight  # the Parameter itself: `main_grad` is an attribute of this object
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.to(weight.dtype)
        grad_input = dy.matmul(weight) if ctx.needs_input_grad[0] else None
        param = ctx.param
        if param.main_grad is None:
            param.main_grad = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        accumulate_wgrad(param.main_grad, x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
        for hook in list(getattr(param, HOOKS, ())):
            hook(param)
        return grad_input, None


def dense_wgrad_accum(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The fused layer's forward: x cast to the weight's dtype (bf16 autocast's cast), autocast off inside."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return DenseWgradAccum.apply(x.to(weight.dtype), weight)


def fusable(module: nn.Module) -> bool:
    """A dense projection whose forward takes the fused path when `fuse_wgrad` is set: `DenseLinear`, or the
    tensor-parallel `DenseTP` shard (megaeff/distributed/tensor_parallel/base.py; recognized by its declared
    `method` and switch, since megaeff/layers does not import the distributed package). The tensor-parallel head
    (`lm_head`, set by megaeff/distributed/parallelize.py) is left alone, as the single-process head is."""
    from megaeff.layers.linear import DenseLinear

    if type(module) is DenseLinear:
        return True
    declared = getattr(module, "method", None) == "dense" and "fuse_wgrad" in type(module).__dict__
    return declared and not getattr(module, "lm_head", False)


def enable(model: nn.Module) -> List[nn.Parameter]:
    """Switch every dense projection of `model` (`fusable`: single-process or tensor-parallel shard) to the fused
    path; returns their weights (marked)."""
    weights = []
    for name, module in model.named_modules():
        if fusable(module):
            if type(module.ops) is not ActivationOps:  # an FP8 policy replaces the GEMMs this Function computes
                raise ValueError(f"{name}: activation policy {module.ops.name!r} has its own dense GEMMs")
            module.fuse_wgrad = True
            mark_fused(module.weight)
            weights.append(module.weight)
    return weights
