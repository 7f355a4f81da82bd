"""What a step on fake tensors needs answered beyond the fake mode itself (megaeff/train/memory/tracker.py).

- Ops on real tensors only run for real: the batch's token ids and what the step derives from them (FSSDP's
  sparse-embedding routing, SLTrain's support offsets) have real values, so data-dependent shapes are exact.
- Collectives among real tensors in the fake world return what they would if every rank mirrored this one.
- SLTrain's sparse path: torch's sparse CSR kernels have no fake-tensor implementation, so the CSR tensor is a
  real one with stand-in parts and its products are fake tensors of the products' shapes.
"""

from __future__ import annotations

from typing import List

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._pytree import tree_leaves


def all_real(args, kwargs) -> bool:
    """At least one tensor argument, and none of them fake."""
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return bool(tensors) and not any(isinstance(t, FakeTensor) for t in tensors)


_SPARSE = (torch.sparse_csr, torch.sparse_csc)


def sparse_stand_in(func, args, kwargs):
    """SLTrain's sparse path on fake values (torch's sparse CSR kernels have no fake-tensor implementation): the
    CSR tensor is real, with untracked real stand-ins for its fake parts (the fake tensors are the tracked
    storages, as the real CSR aliases its parts); a product with it is a fake
    dense tensor of the product's shape, and `sampled_addmm` a real clone of the pattern (new index and value
    storages, as the real op allocates). Returns (handled, result)."""
    aten = torch.ops.aten
    if func is aten.sparse_compressed_tensor.comp_plain_value_size:
        if any(isinstance(t, FakeTensor) for t in args[:3]):
            with unset_fake_temporarily():  # invariants are not checked: zeros serve for fake offsets and columns
                parts = [t if not isinstance(t, FakeTensor) else torch.zeros(t.shape, dtype=t.dtype) for t in args[:3]]
                return True, func(*parts, *args[3:], **kwargs)
    if func is aten.mm.default and args[0].layout in _SPARSE and isinstance(args[1], FakeTensor):
        return True, torch.empty((args[0].shape[0], args[1].shape[1]), dtype=args[1].dtype)
    if func is aten.sparse_sampled_addmm.default and args[0].layout in _SPARSE:
        with unset_fake_temporarily():
            return True, args[0].clone()
    return False, None


def mirror_collective(func, args) -> None:
    """What a collective on real tensors returns in a fake world where every rank mirrors this one (holds this
    rank's data): in an all-to-all, rank j sends me the block it addresses to me, which is the block I address
    to myself, so every received block is that one (FSSDP's embedding: each rank asks me for the ids I own of
    my batch); a sum all-reduce multiplies by the group.
    Not "recv splits = send splits" (rank j sends me the block I send to j): that is another world, where the
    rows I serve are the rows I request, and it undercounts or overcounts FSSDP's `sparse_all_gather` as soon
    as my ids are not spread evenly over the owners (tools/bench/planner_validate.py found it against real
    gloo ranks holding the same tokens)."""
    if func is torch.ops.c10d.alltoall_base_.default:
        out, x, pg, send_splits = args[0], args[1], args[2], args[4]
        p = torch.distributed.ProcessGroup.unbox(pg)
        me, size = p.rank(), p.size()
        rows = list(send_splits) or [x.shape[0] // size] * size
        mine = x.narrow(0, sum(rows[:me]), rows[me])
        if out.shape[0] == size * rows[me] and out.shape[1:] == x.shape[1:]:
            out.copy_(mine.repeat(size, *([1] * (x.dim() - 1))))
    elif func is torch.ops.c10d.allreduce_.default:
        for t in args[0]:
            t.mul_(torch.distributed.ProcessGroup.unbox(args[1]).size())


def storage_parts(t, func) -> List[torch.Tensor]:
    """The tensors holding `t`'s memory: itself, or a sparse tensor's index and value tensors (a constructor's
    output aliases its inputs, which were counted when made)."""
    if not isinstance(t, torch.Tensor) or t.layout == torch.strided:
        return [t]
    if t.layout in _SPARSE and func is not torch.ops.aten.sparse_compressed_tensor.comp_plain_value_size:
        if t.layout == torch.sparse_csr:
            return [t.crow_indices(), t.col_indices(), t.values()]
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return []
