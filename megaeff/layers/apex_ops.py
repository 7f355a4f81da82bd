"""NVIDIA apex on CUDA, where it is installed (the NGC PyTorch image ships it): what megaeff takes from it and why.

Used:
- the fused RMSNorm kernel (`apex.normalization.fused_layer_norm`: one kernel for the forward, one for the
  backward, instead of ~6 elementwise/reduction kernels and their fp32 temporaries), in `RMSNorm.forward` on CUDA
  tensors (megaeff/layers/norm.py asks `fused_rmsnorm` first, and falls back to the activation policy's formula);
- the multi-tensor Adam kernel (`amp_C.multi_tensor_adam` through `apex.multi_tensor_apply`), only when
  `optim.impl=apex` (megaeff/optim/apex_adam.py; `auto` keeps torch's fused AdamW, docs/gpu.md says why);
- the weight-gradient GEMM accumulating into fp32 (`fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32`,
  Megatron's `gradient_accumulation_fusion`), only when `precision.grad_accum_fusion=true` (which needs bf16
  weights, `precision.param_dtype=bf16`): each micro-batch's dense weight gradient goes straight into the fp32
  `main_grad` instead of a bf16 `.grad` rounded at every micro-batch (megaeff/layers/grad_accum_fusion.py, which
  falls back to torch's fp32 `addmm_` off CUDA, without apex, or with MEGAEFF_DISABLE_APEX=1). With fp32 weights
  it is not offered: autograd's `.grad` is already the fp32 accumulator there (docs/gpu.md).

Numerics of the fused RMSNorm: the same formula as `ActivationOps.rmsnorm` (fp32 statistics whatever the input
dtype, x * rsqrt(mean(x^2) + eps) * g, one rounding to the input dtype), but the mean is summed in another order
and rsqrt is CUDA's, so results agree within fp32 round-off, not bit for bit (tests/gpu/test_accelerators.py
bounds the difference). It is used only where that is the whole contract: the default high-precision activation
policy (an FP8 policy changes what is saved for backward, so it keeps its own formula), not under torch.compile
(inductor fuses the formula itself, and apex's ops would break the graph), and never when MEGAEFF_DISABLE_APEX=1
(for A/B comparisons).
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from megaeff.layers.ops import ActivationOps

DISABLE_ENV = "MEGAEFF_DISABLE_APEX"
# The parts megaeff probes: name -> (importable module, what it provides).
PARTS = {
    "fused_rmsnorm": ("fused_layer_norm_cuda", "FusedRMSNorm / fused_rms_norm_affine kernels"),
    "multi_tensor_adam": ("amp_C", "multi_tensor_applier + amp_C.multi_tensor_adam (FusedAdam's kernel)"),
    "grad_accum_fusion": ("fused_weight_gradient_mlp_cuda", "weight-gradient GEMM accumulating into fp32 main grads"),
}
NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ApexStatus:
    """What an `import apex` finds: `found` (apex importable), its version, and each part's import error ("" when
    the part's compiled extension loads)."""

    found: bool
    version: str = ""
    reason: str = ""
    parts: Dict[str, str] = field(default_factory=dict)

    def has(self, part: str) -> bool:
        return self.found and self.parts.get(part, "missing") == ""


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


@functools.lru_cache(maxsize=None)
def apex_status() -> ApexStatus:
    """Probed once per process: importing apex's CUDA extensions is slow and their presence cannot change."""
    try:
        apex = importlib.import_module("apex")
    except Exception as exc:  # ImportError, or a broken build raising anything while it loads
        return ApexStatus(False, reason=f"apex is not importable ({type(exc).__name__}: {exc})")
    version = str(getattr(apex, "__version__", "") or "unknown")
    parts = {}
    for name, (module, _) in PARTS.items():
        try:
            importlib.import_module(module)
            parts[name] = ""
        except Exception as exc:
            parts[name] = f"{module} is not importable ({type(exc).__name__}: {exc}); apex was built without it"
    return ApexStatus(True, version, "", parts)


@functools.lru_cache(maxsize=None)
def _rmsnorm_functions():
    """(same-dtype, mixed-dtype) fused RMSNorm functions, or None where this apex lacks them."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine, mixed_dtype_fused_rms_norm_affine
    except Exception:
        return None
    return fused_rms_norm_affine, mixed_dtype_fused_rms_norm_affine


def rmsnorm_unavailable(x: torch.Tensor, weight: torch.Tensor, ops: ActivationOps) -> Optional[str]:
    """Why the apex kernel does not run this RMSNorm (None: it does). Cheap on CPU: the device test comes first."""
    if not x.is_cuda:
        return "the input is not a CUDA tensor"  # a constant: this line runs in every CPU forward, compiled too
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return "a tensor subclass (DTensor, fake or FP8 tensor): apex takes plain tensors"
    if type(ops) is not ActivationOps:
        return f"activation policy {ops.name!r} computes RMSNorm itself"
    if torch.compiler.is_compiling():
        return "under torch.compile (inductor fuses the formula)"
    if x.dtype not in NORM_DTYPES or weight.dtype not in NORM_DTYPES:
        return f"dtypes {x.dtype}/{weight.dtype} are not apex's"
    if disabled():
        return f"{DISABLE_ENV} is set"
    status = apex_status()
    if not status.has("fused_rmsnorm"):
        return status.reason or status.parts.get("fused_rmsnorm", "apex has no fused RMSNorm")
    if _rmsnorm_functions() is None:
        return "apex.normalization has no fused_rms_norm_affine (apex too old)"
    return None


def fused_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, ops: ActivationOps) -> Optional[torch.Tensor]:
    """apex's RMSNorm of `x` with `ActivationOps.rmsnorm`'s contract (output in x's dtype), or None where it does
    not apply (the caller then computes the formula)."""
    if rmsnorm_unavailable(x, weight, ops) is not None:
        return None
    same, mixed = _rmsnorm_functions()
    fn: Callable = same if x.dtype == weight.dtype else mixed
    # Autocast off: apex would otherwise cast x and g to the autocast dtype first, which ActivationOps never does.
    with torch.autocast("cuda", enabled=False):
        y = fn(x, weight, (x.shape[-1],), eps)
    return y.to(x.dtype)
