"""Megatron's conjugate autograd collectives (Megatron's `mappings.py`), each the conjugate of another:

    copy_to_region      identity       | all-reduce      (enter a TP region with a replicated input)
    reduce_from_region  all-reduce     | identity        (leave it with partial sums)
    gather_seq          all-gather     | reduce-scatter  (enter a TP region from sequence-parallel shards)
    reduce_scatter_seq  reduce-scatter | all-gather      (leave it into sequence-parallel shards)
    split_along         split (no comm)| all-gather      (replicated -> sharded along `dim`)
    gather_along        all-gather     | split (no comm) (sharded along `dim` -> replicated, e.g. last dim)

Each forward and backward goes through the plain collectives of megaeff/distributed/comm.py, so bytes are
recorded by its convention; every mapping is the identity for a group of one.
"""

from __future__ import annotations

import torch

from megaeff.distributed.comm import CommGroup, all_gather, all_reduce, reduce_scatter, split


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cg):
        ctx.cg = cg
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return all_reduce(dy, ctx.cg), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cg):
        return all_reduce(x, cg)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cg, dim):
        ctx.cg, ctx.dim = cg, dim
        return all_gather(x, cg, dim)

    @staticmethod
    def backward(ctx, dy):
        return reduce_scatter(dy, ctx.cg, ctx.dim, "sequence"), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cg, dim):
        ctx.cg, ctx.dim = cg, dim
        return reduce_scatter(x, cg, dim, "sequence (sequence parallelism)")

    @staticmethod
    def backward(ctx, dy):
        return all_gather(dy, ctx.cg, ctx.dim), None, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cg, dim, what):
        ctx.cg, ctx.dim = cg, dim
        return split(x, cg, dim, what)

    @staticmethod
    def backward(ctx, dy):
        return all_gather(dy, ctx.cg, ctx.dim), None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cg, dim):
        ctx.cg, ctx.dim = cg, dim
        return all_gather(x, cg, dim)

    @staticmethod
    def backward(ctx, dy):
        return split(dy, ctx.cg, ctx.dim), None, None


def copy_to_region(x: torch.Tensor, cg: CommGroup) -> torch.Tensor:
    """Identity forward, all-reduce backward: a replicated tensor consumed by shard-local computation. Also
    used on a replicated *parameter* whose per-rank gradients are partial sums."""
    return x if cg.size == 1 else _CopyToRegion.apply(x, cg)


def reduce_from_region(x: torch.Tensor, cg: CommGroup) -> torch.Tensor:
    """All-reduce forward, identity backward: partial sums -> the replicated total."""
    return x if cg.size == 1 else _ReduceFromRegion.apply(x, cg)


def gather_seq(x: torch.Tensor, cg: CommGroup, dim: int = 1) -> torch.Tensor:
    """All-gather along the sequence forward, reduce-scatter backward (sequence parallelism, into a TP region)."""
    return x if cg.size == 1 else _GatherSeq.apply(x, cg, dim)


def reduce_scatter_seq(x: torch.Tensor, cg: CommGroup, dim: int = 1) -> torch.Tensor:
    """Reduce-scatter along the sequence forward, all-gather backward (out of a TP region, sequence parallel)."""
    return x if cg.size == 1 else _ReduceScatterSeq.apply(x, cg, dim)


def split_along(x: torch.Tensor, cg: CommGroup, dim: int, what: str = "dimension") -> torch.Tensor:
    """Keep this rank's slice forward, all-gather backward (a replicated tensor becomes sharded)."""
    return x if cg.size == 1 else _Split.apply(x, cg, dim, what)


def gather_along(x: torch.Tensor, cg: CommGroup, dim: int) -> torch.Tensor:
    """All-gather forward, keep this rank's slice backward (sharded -> replicated, e.g. the last dim)."""
    return x if cg.size == 1 else _Gather.apply(x, cg, dim)


def gather_last(x: torch.Tensor, cg: CommGroup) -> torch.Tensor:
    return gather_along(x, cg, -1)


def split_last(x: torch.Tensor, cg: CommGroup) -> torch.Tensor:
    return split_along(x, cg, -1, "last dimension")
