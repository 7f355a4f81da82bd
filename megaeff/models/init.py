"""Layout-independent initialization.

Every logical weight is a pure function of (global seed, parameter name): its values come from a generator
seeded by a hash of both, drawn on the CPU in fp32 in the logical shape. Any parallel layout that keeps the
logical names (and slices the logical tensor) therefore starts from exactly the single-process weights, without
communicating them. Structure that methods derive from the seed (SLTrain's sparse supports, LOST's channel sets
from the SVD of the dense draw) is regenerated the same way, so it is never communicated either.

Modules with `init_weights(prefix, init)` receive an `Initializer`: callable as the dense N(0, std) rule (the
original `normal_(name, tensor)` interface, bit-identical), plus `uniform_` and keyed `generator(name)`.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from megaeff.layers.norm import RMSNorm


def name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"megaeff/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(name_seed(seed, name))


class Initializer:
    """The init interface handed to every module's `init_weights(prefix, init)`.

    Calling it is the dense rule, `init(name, tensor)`: N(0, std) drawn from the generator of (seed, name), so
    modules written against the original `normal_(name, tensor)` signature work unchanged and produce bit-identical
    weights. Methods that need more draw through the same keyed streams:

    - `uniform_(name, tensor, bound)`: U(-bound, bound) from the generator of (seed, name);
    - `generator(name)`: a dedicated CPU generator for (seed, name), e.g. for a sparse support;
    - `seed`, `std`: the global seed and the model's init std.
    Every draw happens on the CPU in fp32 in the logical shape, whatever the device and dtype of the target.

    `weights` (logical name -> tensor, e.g. a pretrained checkpoint's, megaeff/interop/hf_import.py) replaces the
    dense rule's draw for the names it holds: a layer whose init derives structure from its dense weight (LOST's
    SVD and channel set) then derives it from that weight, in every layout, as it would from the random one.
    """

    def __init__(self, seed: int, std: float, weights: Optional[Mapping[str, torch.Tensor]] = None):
        self.seed = int(seed)
        self.std = float(std)
        self.weights = weights

    def generator(self, name: str) -> torch.Generator:
        return generator_for(self.seed, name)

    def normal_(self, name: str, tensor: torch.Tensor) -> None:
        if self.weights is not None and name in self.weights:
            with torch.no_grad():
                tensor.copy_(self.weights[name])
            return
        values = torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, self.std, generator=self.generator(name))
        with torch.no_grad():
            tensor.copy_(values)

    __call__ = normal_

    def uniform_(self, name: str, tensor: torch.Tensor, bound: float) -> None:
        values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=self.generator(name))
        with torch.no_grad():
            tensor.copy_(values)


def _init_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(32, cores))


def _run_parallel(jobs, init: Initializer, workers: int) -> None:
    """Run expensive, independent module inits (LOST's SVDs) in threads. Each one computes with a single intra-op
    thread, which keeps its result bit-identical to a serial run (and to every other rank)."""

    def run(job):
        prefix, module = job
        with torch.no_grad():  # grad mode is thread-local
            module.init_weights(prefix, init)

    if workers == 1:  # in this thread, with its dispatch modes
        for job in jobs:
            run(job)
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            list(pool.map(run, jobs))
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def init_weights(
    model: nn.Module,
    seed: int,
    std: float,
    workers: Optional[int] = None,
    weights: Optional[Mapping[str, torch.Tensor]] = None,
) -> None:
    """Fill every parameter of a materialized model. Raises if some parameter has no rule (it would stay garbage).
    Modules that declare `parallel_init = True` (their init is costly and depends only on (seed, name)) are
    initialized concurrently by `workers` threads (default: the usable cores, at most 32). `weights`: dense
    weights that replace the random draws of those names (see `Initializer`); it must be safe to read from
    several threads."""
    normal_ = Initializer(seed, std, weights)
    done = set()
    deferred = []
    for prefix, module in model.named_modules():
        if module is model:
            continue
        if hasattr(module, "init_weights") and not isinstance(module, RMSNorm):
            if getattr(module, "parallel_init", False):
                deferred.append((prefix, module))
            else:
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
    if deferred:
        # A dispatch mode (the memory tracker's fake tensors) is thread-local: pool threads would not see it.
        _run_parallel(deferred, normal_, 1 if is_in_torch_dispatch_mode() else workers or _init_workers())
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()


def materialize(
    model: nn.Module, device: torch.device, seed: int, std: float, weights: Optional[Mapping[str, torch.Tensor]] = None
) -> nn.Module:
    """Allocate a meta-built model on `device` and initialize it from the seed (and `weights`, see `Initializer`)."""
    model.to_empty(device=device)
    init_weights(model, seed, std, weights=weights)
    return model
