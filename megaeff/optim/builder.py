"""Optimizer construction. Weight decay applies to matrices only (not norms), the usual LLaMA recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

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
    if impl == "auto":
        return "fused" if device.type == "cuda" else "foreach"
    return impl


def uses_fp8_states(ocfg: OptimConfig, pcfg: Optional[PrecisionConfig]) -> bool:
    return ocfg.name == "coat_adamw" or bool(getattr(pcfg, "fp8_optimizer_states", False))


def build_optimizer(
    model: nn.Module, ocfg: OptimConfig, device: torch.device, pcfg: Optional[PrecisionConfig] = None
) -> Tuple[torch.optim.Optimizer, str]:
    """Returns the optimizer and a description of the implementation actually used (for the run log)."""
    if uses_fp8_states(ocfg, pcfg):
        from megaeff.optim.coat_adamw import CoatAdamW

        opt = CoatAdamW(
            param_groups(model, ocfg.weight_decay),
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
        for name, p in model.named_parameters():
            meta = param_meta(p)
            problem = shard_group_problem(tuple(p.shape), meta.logical_shape, meta.tp_split) if opt.uses_fp8(p) else ""
            if problem:
                raise ConfigError(
                    "parallel.tp",
                    f"FP8 optimizer states of {name}: {problem} (COAT's groups must not straddle "
                    "tensor-parallel shards); use a tp degree that keeps whole groups, or optim=adamw",
                )
        moments = f"{ocfg.first_moment}/{ocfg.second_moment}" + (" + range expansion" if ocfg.expand else "")
        return opt, f"FP8 moments {moments}, kernel {opt.backend.name}"
    impl = resolve_impl(ocfg.impl, device)
    kwargs = dict(lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps)
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return torch.optim.AdamW(param_groups(model, ocfg.weight_decay), **kwargs), impl
