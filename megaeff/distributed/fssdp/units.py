"""The runtime pieces of FSSDP (megaeff/distributed/fssdp/engine.py): a unit (the tensors gathered together), one
forward call of it (an instance, owning the gathered storage), a launched gather, and the autograd Function
whose forward hands the gathered tensors to the unit's modules and whose backward reduce-scatters their
gradients."""

from __future__ import annotations

import os
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

    __slots__ = ("unit", "storages", "shapes", "dtypes", "grad", "open", "freed", "done", "prefetch", "versions", "__weakref__")

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


class GatherUnit(torch.autograd.Function):
    """Forward: the unit's gathered tensors (computed outside, handed over through `fulls`); backward: the
    reduce-scatter of their gradients into the shards' `.grad` (done by the FSSDP object, so nothing is returned
    to autograd for the shards)."""

    @staticmethod
    def forward(ctx, fs, inst, fulls, *shards):
        ctx.fs, ctx.inst = fs, inst
        ctx.set_materialize_grads(False)
        return tuple(fulls)

    @staticmethod
    def backward(ctx, *grads):
        ctx.fs._backward(ctx.inst, grads)
        return (None, None, None) + (None,) * len(grads)


def resolve_node_size(node_size: int, dp: int, tp: int = 1) -> int:
    """A node's size in dp_cp ranks. 0: the launcher's LOCAL_WORLD_SIZE over tp (tp is the innermost axis, so
    a node of L consecutive ranks holds L / tp consecutive members of each dp_cp group), else one node."""
    if node_size < 0:
        raise ValueError(f"node_size must be >= 0, got {node_size}")
    if node_size == 0:
        node_size = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) // max(1, tp) or dp
    node_size = min(node_size, dp)
    if dp % node_size:
        raise ValueError(f"FSSDP node_size {node_size} does not divide the dp_cp degree {dp}")
    return node_size
