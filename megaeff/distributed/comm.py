"""Collectives, each one counted in bytes by group and kind.

Every collective in megaeff goes through this module so that the per-step metrics can report exactly what was
sent. The counters live in a `CommStats` object owned by `ParallelDims` (no module-level state).

Byte convention (one rule for every kind): a call records the **payload**, the size in bytes of the full
logical tensor the collective is about, once per call on every rank:
- all_reduce: the tensor reduced (N x h reduced -> N*h*e);
- all_gather: the gathered result (p shards of N/p x h -> N*h*e);
- reduce_scatter: the input before scattering (N x h -> N*h*e).
A ring implementation moves (p-1)/p of the payload per rank for all-gather and reduce-scatter, and 2(p-1)/p for
all-reduce, so a Megatron all-reduce pair and its sequence-parallel all-gather + reduce-scatter pair record the
same bytes, as they move the same bytes. Nothing is recorded for a group of one (the call is a no-op).

Megatron's conjugate autograd collectives built on these (copy_to_region, gather_seq, ...) are tensor
parallelism's and live in megaeff/distributed/tensor_parallel/mappings.py.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist


class CommStats:
    """Bytes sent through each (group, kind) pair since the last `reset`."""

    def __init__(self) -> None:
        self._bytes: Dict[str, int] = defaultdict(int)

    def record(self, group_name: str, kind: str, nbytes: int) -> None:
        self._bytes[f"{group_name}/{kind}"] += int(nbytes)

    def snapshot(self) -> Dict[str, int]:
        return dict(self._bytes)

    def total(self) -> int:
        return sum(self._bytes.values())

    def reset(self) -> None:
        self._bytes.clear()


class CommGroup(NamedTuple):
    """What a collective needs: the group (None: a group of one), its name for the counters, the stats, and this
    rank's size/index in it. `ParallelDims.comm(name)` builds one."""

    name: str
    group: Optional[object]
    stats: Optional[CommStats]
    size: int
    rank: int

    def record(self, kind: str, nbytes: int) -> None:
        if self.stats is not None:
            self.stats.record(self.name, kind, nbytes)


# torch >= 2.13 renamed the tensor forms (the old names still work, with a FutureWarning).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce_(
    tensor: torch.Tensor, group, group_name: str, stats: Optional[CommStats], op=dist.ReduceOp.SUM
) -> torch.Tensor:
    """In-place all-reduce; a no-op for a group of one. Counts the payload once per call (not per algorithm hop)."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    if stats is not None:
        stats.record(group_name, "all_reduce", _nbytes(tensor))
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_scalar(
    value: float, group, group_name: str, stats: Optional[CommStats], device, op=dist.ReduceOp.SUM
) -> float:
    # NCCL only reduces device tensors, so the scalar travels on the training device.
    t = torch.tensor([value], dtype=torch.float64, device=device)
    return float(all_reduce_(t, group, group_name, stats, op)[0])


# ---------------------------------------------------------------------------------------------------- plain ops
def check_divisible(size: int, cg: CommGroup, what: str) -> None:
    if size % cg.size:
        raise ValueError(f"{what} of size {size} is not divisible by the {cg.name} degree {cg.size}")


def all_reduce(x: torch.Tensor, cg: CommGroup, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Out-of-place all-reduce (the input is left alone: autograd may have saved it)."""
    if cg.size == 1:
        return x
    out = x.contiguous().clone()
    return all_reduce_(out, cg.group, cg.name, cg.stats, op)


def all_gather(x: torch.Tensor, cg: CommGroup, dim: int) -> torch.Tensor:
    """Concatenate the p equal shards along `dim`, in group-rank order."""
    if cg.size == 1:
        return x
    buf = torch.empty(cg.size * x.numel(), dtype=x.dtype, device=x.device)
    cg.record("all_gather", _nbytes(buf))
    _ALL_GATHER(buf, x.contiguous().view(-1), group=cg.group)
    return torch.cat(buf.view(cg.size, *x.shape).unbind(0), dim=dim)


def reduce_scatter(x: torch.Tensor, cg: CommGroup, dim: int, what: str = "dimension") -> torch.Tensor:
    """Sum over the group, keep this rank's 1/p slice along `dim`."""
    if cg.size == 1:
        return x
    check_divisible(x.shape[dim], cg, what)
    stacked = torch.stack(x.chunk(cg.size, dim=dim))  # rank q's slice at row q, contiguous
    out = torch.empty(stacked[0].numel(), dtype=x.dtype, device=x.device)
    cg.record("reduce_scatter", _nbytes(x))
    _REDUCE_SCATTER(out, stacked.view(-1), group=cg.group)
    return out.view(stacked.shape[1:])


def split(x: torch.Tensor, cg: CommGroup, dim: int, what: str = "dimension") -> torch.Tensor:
    """This rank's 1/p slice along `dim` (no communication)."""
    if cg.size == 1:
        return x
    check_divisible(x.shape[dim], cg, what)
    return x.chunk(cg.size, dim=dim)[cg.rank].contiguous()


def all_gather_uneven(x: torch.Tensor, cg: CommGroup) -> List[torch.Tensor]:
    """Every rank's 1-D tensor, whatever its length (sparse-value shards); for export and tests, not per step.
    Records the sizes exchanged and the padded payload."""
    if cg.size == 1:
        return [x]
    n = torch.tensor([x.numel()], dtype=torch.int64, device=x.device)
    sizes = all_gather(n, cg, 0).tolist()
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x.reshape(-1)
    gathered = all_gather(padded, cg, 0).view(cg.size, -1)
    return [gathered[i, :s] for i, s in enumerate(sizes)]


# ---------------------------------------------------------------------------------------------------- p2p, all-to-all
# Context parallelism (megaeff/distributed/context_parallel/attention.py) moves blocks between chosen peers rather than
# reducing over a group. Byte convention for these: a point-to-point transfer records, on the *sending* rank,
# the bytes of each tensor it sends ("p2p_send"; the receiver records nothing, so a sum over ranks counts every
# transfer once); an all-to-all records its input, the tensor this rank scatters, own block included
# ("all_to_all"; (p-1)/p of it leaves the rank), the same "full logical tensor" rule as the collectives above.
# Meta tensors carry shapes only: a dry run that traces memory and bytes (tools/bench/context_parallel.py)
# records them and moves nothing.


class P2PRequests:
    """The in-flight transfers of one batch. A receive buffer may be read, and a send buffer reused, only after
    `wait()`; the send tensors are kept alive here until then."""

    def __init__(self, works: list, keep: list) -> None:
        self._works, self._keep = works, keep

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works, self._keep = [], []


def batch_p2p(cg: CommGroup, sends=(), recvs=()) -> P2PRequests:
    """Post every send and receive at once (`dist.batch_isend_irecv`) and return without waiting, so the caller
    can compute while the transfers run. `sends` holds (tensor, peer) or (tensor, peer, tag), `recvs` (buffer,
    peer) or (buffer, peer, tag); peers are ranks *within* `cg`. Both ends must post matching ops in the same
    order; distinct tags keep transfers between one pair of ranks apart on gloo (NCCL matches by order)."""
    ops, keep = [], []
    for entry in sends:
        t, peer, tag = (*entry, 0) if len(entry) == 2 else entry
        t = t.contiguous()  # gloo and NCCL send flat memory; the copy stays alive until wait()
        cg.record("p2p_send", _nbytes(t))
        keep.append(t)
        ops.append((dist.isend, t, peer, tag))
    for entry in recvs:
        buf, peer, tag = (*entry, 0) if len(entry) == 2 else entry
        if not buf.is_contiguous():
            raise ValueError("batch_p2p receives into contiguous buffers only")
        ops.append((dist.irecv, buf, peer, tag))
    if not ops or all(t.device.type == "meta" for _, t, _, _ in ops):
        return P2PRequests([], keep)
    if cg.size == 1:
        raise ValueError(f"point-to-point transfer inside the {cg.name} group of one rank")
    works = dist.batch_isend_irecv(
        [dist.P2POp(op, t, group=cg.group, group_peer=peer, tag=tag) for op, t, peer, tag in ops]
    )
    return P2PRequests(list(works or []), keep)


def all_to_all(x: torch.Tensor, cg: CommGroup) -> torch.Tensor:
    """Dim 0 of `x` holds `cg.size` equal blocks; block j goes to rank j. Returns the blocks received, block j
    from rank j (`dist.all_to_all_single`). Records the input (see the byte convention above)."""
    if cg.size == 1:
        return x
    check_divisible(x.shape[0], cg, "all-to-all dimension 0")
    x = x.contiguous()
    cg.record("all_to_all", _nbytes(x))
    out = torch.empty_like(x)
    if x.device.type != "meta":
        dist.all_to_all_single(out, x, group=cg.group)
    return out


def all_to_all_uneven(
    x: torch.Tensor, cg: CommGroup, send_splits, recv_splits, kind: str = "all_to_all"
) -> torch.Tensor:
    """Dim 0 of `x` is cut into blocks of `send_splits[j]` rows, block j to rank j; returns the blocks received,
    `recv_splits[j]` rows from rank j, in rank order (`dist.all_to_all_single` with uneven splits). The caller
    must pass splits that agree across ranks (my recv_splits[j] is rank j's send_splits[me]); MoE dispatch derives
    both from one table every rank holds. Records the input under `kind` (own block included, as `all_to_all`),
    so the sparse all-gather and reduce-scatter of expert FSSDP are counted apart from the token exchange."""
    if cg.size == 1:
        return x
    send_splits, recv_splits = [int(s) for s in send_splits], [int(s) for s in recv_splits]
    if sum(send_splits) != x.shape[0]:
        raise ValueError(f"send splits {send_splits} do not add up to the {x.shape[0]} rows to send")
    x = x.contiguous()
    cg.record(kind, _nbytes(x))
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    if x.device.type != "meta":
        dist.all_to_all_single(out, x, recv_splits, send_splits, group=cg.group)
    return out


# ---------------------------------------------------------------------------------------------------- flat, async
# Fully sharded data parallelism (megaeff/distributed/fssdp/engine.py) packs many tensors into one flat buffer per
# collective and overlaps the collective with compute, so these take caller-owned flat buffers and may return
# the pending Work instead of waiting. Same byte convention as above; nothing is recorded for a group of one,
# and meta buffers are recorded without moving anything (dry runs that count bytes).


def all_gather_flat(out: torch.Tensor, x: torch.Tensor, cg: CommGroup, async_op: bool = False):
    """Flat `x` (this rank's slot) from every rank into flat `out` (cg.size slots, in group-rank order). Returns
    the Work to wait on when `async_op`, else None. Records `out` (the gathered payload)."""
    if out.numel() != cg.size * x.numel() or out.dtype != x.dtype:
        raise ValueError(
            f"all_gather_flat: {out.numel()} {out.dtype} output for {cg.size} slots of {x.numel()} {x.dtype}"
        )
    if cg.size == 1:
        out.copy_(x)
        return None
    cg.record("all_gather", _nbytes(out))
    if out.device.type == "meta":
        return None
    return _ALL_GATHER(out, x, group=cg.group, async_op=async_op)


def reduce_scatter_flat(out: torch.Tensor, x: torch.Tensor, cg: CommGroup, async_op: bool = False):
    """Sum flat `x` (cg.size slots, slot q for rank q) over the group; this rank's summed slot lands in `out`.
    Returns the Work to wait on when `async_op`, else None. Records `x` (the payload before scattering)."""
    if x.numel() != cg.size * out.numel() or out.dtype != x.dtype:
        raise ValueError(
            f"reduce_scatter_flat: {out.numel()} {out.dtype} output for {cg.size} slots of {x.numel()} {x.dtype}"
        )
    if cg.size == 1:
        out.copy_(x)
        return None
    cg.record("reduce_scatter", _nbytes(x))
    if out.device.type == "meta":
        return None
    return _REDUCE_SCATTER(out, x, op=dist.ReduceOp.SUM, group=cg.group, async_op=async_op)
