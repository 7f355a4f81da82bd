"""The runtime pieces of FSSDP: a unit (the tensors gathered together; the plan builds them, plan.py), one
forward call of it (an instance, owning the gathered storage; the engine's, engine.py), a launched gather, and
the autograd Function whose forward hands the gathered tensors to the unit's modules and whose backward hands
their gradients to the gradient sync (grad_sync.py)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from megaeff.distributed.fssdp.layout import FlatGroup


class Pending:
    """A launched gather of one unit: per flat group (work, recv, send), and the parameter versions it read."""

    __slots__ = ("parts", "versions")

    def __init__(self, parts, versions):
        self.parts, self.versions = parts, versions


class Instance:
    """One forward call of a unit. It holds the gathered *storages*, not the tensors: the tensors carry the
    autograd Function whose context points back here, and a reference cycle through autograd would outlive the
    graph."""

    __slots__ = (
        "unit",
        "storages",
        "shapes",
        "dtypes",
        "grad",
        "open",
        "freed",
        "done",
        "prefetch",
        "versions",
        "__weakref__",
    )

    def __init__(self, unit: "Unit", versions):
        self.unit, self.versions = unit, versions
        self.storages: List[torch.UntypedStorage] = []
        self.shapes: List[torch.Size] = []
        self.dtypes: List[torch.dtype] = []
        self.grad = self.open = self.freed = self.done = False
        self.prefetch: Optional[Pending] = None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.storages)


class Unit:
    def __init__(self, name: str, is_rest: bool):
        self.name, self.is_rest = name, is_rest
        self.flats: List[FlatGroup] = []
        self.params: List[nn.Parameter] = []  # the shards, in flat order
        self.sites: List[List[Tuple[nn.Module, str]]] = []  # where each full tensor is exposed
        self.next: Optional["Unit"] = None  # whose gather to prefetch when this one starts
        self.prefetched: Optional[Pending] = None
        self.current: Optional[Instance] = None
        self.acc: Optional[List[Optional[torch.Tensor]]] = None  # unsharded gradients of deferred micro-batches

    def versions(self):
        return tuple(p._version for p in self.params)

    def launch(self, async_op: bool) -> Pending:
        parts, i = [], 0
        for flat in self.flats:
            n = len(flat.shards)
            parts.append(flat.launch_gather([p.detach() for p in self.params[i : i + n]], async_op=async_op))
            i += n
        return Pending(parts, self.versions())

    def complete(self, pending: Pending) -> List[torch.Tensor]:
        out = []
        for flat, (work, recv, _send) in zip(self.flats, pending.parts):
            if work is not None:
                work.wait()
            out.extend(flat.unpack(recv))
        return out

    def retire_prefetch(self) -> None:
        """Wait for the prefetched gather, if any, and drop it (its buffers go)."""
        if self.prefetched is not None:
            self.complete(self.prefetched)
            self.prefetched = None


class GatherUnit(torch.autograd.Function):
    """Forward: the unit's gathered tensors (computed outside, handed over through `fulls`); backward: the
    engine releases the instance's gathered storage, then the gradient sync reduce-scatters (or accumulates)
    the gradients into the shards' `.grad` (so nothing is returned to autograd for the shards)."""

    @staticmethod
    def forward(ctx, engine, sync, inst, fulls, *shards):
        ctx.engine, ctx.sync, ctx.inst = engine, sync, inst
        ctx.set_materialize_grads(False)
        return tuple(fulls)

    @staticmethod
    def backward(ctx, *grads):
        ctx.engine.release(ctx.inst)
        ctx.sync.on_unit_backward(ctx.inst, grads)
        return (None, None, None, None) + (None,) * len(grads)
