"""Optimizer construction. Weight decay applies to matrices only (not norms), the usual LLaMA recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from megaeff.errors import ConfigError
from megaeff.layers.param_meta import param_meta
from megaeff.precision.group_quant import shard_group_problem

if TYPE_CHECKING:
    from megaeff.config.optim import OptimConfig, PrecisionConfig


def param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def resolve_impl(impl: str, device: torch.device) -> str:
    """auto: torch's fused AdamW on CUDA (not apex's: megaeff/optim/apex_adam.py says why) and on CPU (one pass over
    each parameter: 6x less time than foreach at llama_60m, docs/benchmarks.md), foreach elsewhere."""
    if impl == "auto":
        return "fused" if device.type in ("cuda", "cpu") else "foreach"
    return impl


def uses_fp8_states(ocfg: OptimConfig, pcfg: Optional[PrecisionConfig]) -> bool:
    return ocfg.name == "coat_adamw" or bool(getattr(pcfg, "fp8_optimizer_states", False))


def per_parameter(ocfg: OptimConfig, pcfg: Optional[PrecisionConfig]) -> bool:
    """Whether parameters are updated one at a time (megaeff/optim/per_param.py): in backward, or bf16 weights."""
    return bool(ocfg.in_backward) or str(getattr(pcfg, "param_dtype", "fp32")) == "bf16"


def optimizer_factory(
    ocfg: OptimConfig, device: torch.device, pcfg: Optional[PrecisionConfig] = None
) -> Tuple[Callable[[List[Dict]], torch.optim.Optimizer], str]:
    """The constructor of the configured optimizer over given parameter groups, and its description."""
    if uses_fp8_states(ocfg, pcfg):
        from megaeff.optim.coat_adamw import CoatAdamW

        def make_coat(groups: List[Dict]) -> torch.optim.Optimizer:
            return CoatAdamW(
                groups,
                lr=ocfg.lr,
                betas=tuple(ocfg.betas),
                eps=ocfg.eps,
                first_moment=ocfg.first_moment,
                second_moment=ocfg.second_moment,
                expand=ocfg.expand,
                min_fp8_numel=ocfg.min_fp8_numel,
                backend=ocfg.fp8_backend,
                device=device,
            )

        moments = f"{ocfg.first_moment}/{ocfg.second_moment}" + (" + range expansion" if ocfg.expand else "")
        return make_coat, f"FP8 moments {moments}"
    impl = resolve_impl(ocfg.impl, device)
    kwargs = dict(lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps)
    if impl == "apex":
        from megaeff.optim.apex_adam import ApexAdamW, unavailable

        problem = unavailable(device)
        if problem:
            raise ConfigError("optim.impl", f"apex is not usable: {problem}; use optim.impl=auto")
        return (lambda groups: ApexAdamW(groups, **kwargs)), "apex multi-tensor Adam"
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return (lambda groups: torch.optim.AdamW(groups, **kwargs)), impl


def build_optimizer(
    model: nn.Module,
    ocfg: OptimConfig,
    device: torch.device,
    pcfg: Optional[PrecisionConfig] = None,
    seed: int = 0,
) -> Tuple[torch.optim.Optimizer, str]:
    """Returns the optimizer and a description of the implementation actually used (for the run log). `seed`
    (train.seed) seeds GaLore's randomized refreshes (megaeff/optim/galore_projector.py)."""
    if ocfg.name == "galore":
        from megaeff.optim.galore import build_galore

        return build_galore(model, ocfg, seed)
    make, description = optimizer_factory(ocfg, device, pcfg)
    groups = param_groups(model, ocfg.weight_decay)
    if per_parameter(ocfg, pcfg):
        from megaeff.optim.per_param import PerParamOptimizer

        rounding = str(getattr(pcfg, "param_dtype", "fp32")) == "bf16"
        defaults = dict(lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps, weight_decay=ocfg.weight_decay)
        opt = PerParamOptimizer(groups, make, defaults, stochastic_rounding=rounding)
        modes = (["in backward"] if ocfg.in_backward else []) + (["bf16 weights, stochastic rounding"] * rounding)
        description = f"{description}; per-parameter updates ({', '.join(modes)})"
    else:
        opt = make(groups)
    if uses_fp8_states(ocfg, pcfg):
        for name, p in model.named_parameters():
            meta = param_meta(p)
            problem = shard_group_problem(tuple(p.shape), meta.logical_shape, meta.tp_split) if opt.uses_fp8(p) else ""
            if problem:
                raise ConfigError(
                    "parallel.tp",
                    f"FP8 optimizer states of {name}: {problem} (COAT's groups must not straddle "
                    "tensor-parallel shards); use a tp degree that keeps whole groups, or optim=adamw",
                )
        description += f", kernel {opt.backend.name}"
    return opt, description
