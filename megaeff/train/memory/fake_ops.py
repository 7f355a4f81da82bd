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
    """What a collective on real tensors returns in a fake world where every rank mirrors this one: an
    all-to-all gives back what it sends (recv splits = send splits), a sum all-reduce multiplies by the group."""
    if func is torch.ops.c10d.alltoall_base_.default:
        out, x = args[0], args[1]
        if out.shape == x.shape:
            out.copy_(x)
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
