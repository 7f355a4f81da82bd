"""Layout-independent initialization.

Every logical weight is a pure function of (global seed, parameter name): its values come from a generator
seeded by a hash of both, drawn on the CPU in fp32 in the logical shape. Any parallel layout that keeps the
logical names (and slices the logical tensor) therefore starts from exactly the single-process weights, without
communicating them.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from megaeff.layers.norm import RMSNorm


def name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"megaeff/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(name_seed(seed, name))


def make_normal_init(seed: int, std: float):
    def normal_(name: str, tensor: torch.Tensor) -> None:
        values = torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=generator_for(seed, name))
        with torch.no_grad():
            tensor.copy_(values)

    return normal_


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float) -> None:
    """Fill every parameter of a materialized model. Raises if some parameter has no rule (it would stay garbage)."""
    normal_ = make_normal_init(seed, std)
    done = set()
    for prefix, module in model.named_modules():
        if module is model:
            continue
        if hasattr(module, "init_weights") and not isinstance(module, RMSNorm):
            module.init_weights(prefix, normal_)
            done.update(f"{prefix}.{n}" for n, _ in module.named_parameters())
        elif isinstance(module, RMSNorm):
            module.init_weights()
            done.add(f"{prefix}.weight")
        elif isinstance(module, (nn.Embedding, nn.Linear)):
            normal_(f"{prefix}.weight", module.weight)
            done.add(f"{prefix}.weight")
    missing = [n for n, _ in model.named_parameters() if n not in done]
    if missing:
        raise RuntimeError(f"no initialization rule for parameters: {missing}")
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()


def materialize(model: nn.Module, device: torch.device, seed: int, std: float) -> nn.Module:
    """Allocate a meta-built model on `device` and initialize it from the seed."""
    model.to_empty(device=device)
    init_weights(model, seed, std)
    return model
