"""Optimizer construction. Weight decay applies to matrices only (not norms), the usual LLaMA recipe."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


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


def build_optimizer(model: nn.Module, ocfg, device: torch.device) -> Tuple[torch.optim.Optimizer, str]:
    """Returns the optimizer and the implementation actually used (reported in the run log)."""
    impl = resolve_impl(ocfg.impl, device)
    kwargs = dict(lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps)
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return torch.optim.AdamW(param_groups(model, ocfg.weight_decay), **kwargs), impl
