"""This rank's part of a checkpoint as torch.distributed.checkpoint (DCP) sees it: one `LogicalTensor` per logical
tensor, holding the logical shape and the boxes of it this rank has (views of the local tensors, from the
layout's `local_pieces`; megaeff/distributed/parallel_model.py). DCP's default planners read and write them
through its checkpointable protocol, so every rank writes only its boxes and a load reads exactly the bytes
that overlap its boxes, whatever layout wrote them.

State-dict keys: `model/<logical name>` (parameters and persistent buffers) and `optim/<logical name>/<state
key>` (AdamW's moments and `step`, COAT's FP8 codes and their `*_meta` rows). A tensor with no box form is
gathered (`gather`, a collective over its groups) and offered whole by every rank that holds it; DCP's
de-duplication writes it once.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megaeff.distributed.optimizer_state import optimizer_state_by_name
from megaeff.precision.group_quant import META_FIELDS, GroupLayout
from megaeff.train.checkpoint.collective import all_gather_obj

MODEL, OPTIM = "model", "optim"
Chunk = Tuple[Tuple[int, ...], torch.Tensor]


def model_key(name: str) -> str:
    return f"{MODEL}/{name}"


def optim_key(name: str, key: str) -> str:
    return f"{OPTIM}/{name}/{key}"


def split_key(fqn: str) -> Tuple[str, str, str]:
    """(kind, logical name, state key) of a state-dict key (state key '' for model tensors)."""
    kind, _, rest = fqn.partition("/")
    if kind == OPTIM:
        name, _, key = rest.rpartition("/")
        return kind, name, key
    return kind, rest, ""


class LogicalTensor:
    """One logical tensor of the checkpoint: its size and this rank's chunks (offsets, view). Implements DCP's
    checkpointable protocol (`__create_write_items__`, `__create_chunk_list__`, `__get_tensor_shard__`) and
    `size()`, which DCP's default load plan compares with the checkpoint's."""

    def __init__(self, shape: Sequence[int], chunks: List[Chunk], dtype: torch.dtype):
        self.shape = torch.Size(int(d) for d in shape)
        self.chunks = [(tuple(int(o) for o in off), view) for off, view in chunks]
        self.dtype = dtype

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> "LogicalTensor":
        return cls(tensor.shape, [((0,) * tensor.dim(), tensor)], tensor.dtype)

    def size(self) -> torch.Size:
        return self.shape

    @property
    def local_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for _, v in self.chunks)

    def __create_write_items__(self, fqn: str, obj: object) -> List[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(off)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(off), sizes=view.size()),
                    properties=TensorProperties.create_from_tensor(view),
                    size=self.shape,
                ),
            )
            for off, view in self.chunks
        ]

    def __create_chunk_list__(self) -> List[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(off), sizes=view.size()) for off, view in self.chunks]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        if index.index is not None and index.index < len(self.chunks):
            off, view = self.chunks[index.index]
            if torch.Size(off) == index.offset:
                return view
        for off, view in self.chunks:
            if torch.Size(off) == index.offset:
                return view
        raise ValueError(f"{index.fqn}: no chunk at {tuple(index.offset or ())} on this rank")

    def staged(self) -> "LogicalTensor":
        """A host copy of this rank's chunks (the asynchronous save's staging buffer: on a GPU it frees the
        device at once, and the background write reads host memory)."""
        chunks = [(off, view.detach().to("cpu", copy=True)) for off, view in self.chunks]
        return LogicalTensor(self.shape, chunks, self.dtype)


def pieces_of(logical, name: str, key: str, tensor: torch.Tensor) -> Optional[Dict[str, LogicalTensor]]:
    """{logical name: LogicalTensor} of this rank's `tensor`, or None where it has no box form."""
    if logical is None or not hasattr(logical, "local_pieces"):
        return {name: LogicalTensor.whole(tensor)}
    pieces = logical.local_pieces(name, key, tensor)
    if pieces is None:
        return None
    return {n: LogicalTensor(p.logical_shape, p.chunks, tensor.dtype) for n, p in pieces.items()}


def logical_names(logical, name: str) -> List[str]:
    fn = getattr(logical, "local_logical_names", None)
    return fn(name) if fn is not None else [name]


def save_state(model, optimizer, logical) -> Dict[str, LogicalTensor]:
    """What this rank contributes to a checkpoint: its boxes of every logical tensor (no copy; tensors with no
    box form are gathered, a collective in the same order on every rank)."""
    out: Dict[str, LogicalTensor] = {}

    def add(name: str, key: str, tensor: torch.Tensor, fqn: Callable[[str], str]) -> None:
        tensor = tensor.detach()
        pieces = pieces_of(logical, name, key, tensor)
        if pieces is None:
            pieces = {name: LogicalTensor.whole(logical.gather(name, tensor, key))}
        out.update({fqn(n): p for n, p in pieces.items()})

    for name, t in model.state_dict().items():
        add(name, "", t, model_key)
    for name, t in (getattr(logical, "logical_buffers", dict)() if logical is not None else {}).items():
        out[model_key(name)] = LogicalTensor.whole(t.detach())
    for name, st in optimizer_state_by_name(model, optimizer)["state"].items():
        for key, v in st.items():
            if not torch.is_tensor(v):
                raise TypeError(f"optimizer state {name}/{key} is a {type(v).__name__}, not a tensor")
            add(name, key, v, lambda n, key=key: optim_key(n, key))
    return out


def local_state_shape(optimizer, p: torch.Tensor, key: str, saved: TensorStorageMetadata) -> Tuple[int, ...]:
    """The shape of this rank's optimizer state `key` of parameter `p` (the optimizer creates state lazily, so a
    load allocates it first): a scalar, COAT's `*_meta` rows [groups of the local tensor, META_FIELDS], or the
    parameter's shape."""
    if len(saved.size) == 0:
        return ()
    shape_of = getattr(optimizer, "state_shape", None)  # state not shaped like p (GaLore's projected moments)
    shape = shape_of(p, key) if shape_of is not None else None
    if shape is not None:
        return tuple(shape)
    if key.endswith("_meta"):
        layout = getattr(optimizer, "layout", None)
        n = layout(p).n_groups if layout is not None else GroupLayout.for_shape(tuple(p.shape)).n_groups
        return (n, META_FIELDS)
    return tuple(p.shape)


class LoadTargets:
    """Where a load puts what it reads: `state` (the LogicalTensors DCP fills), and what to do after:
    `fallbacks` ((local name, key, full logical tensor, local destination)) to cut with `shard`; `buffers`
    ((name, loaded copy, current)) to compare; `optim` (param name -> {key: local tensor}) for the optimizer."""

    def __init__(self):
        self.state: Dict[str, LogicalTensor] = {}
        self.fallbacks: List[Tuple[str, str, torch.Tensor, torch.Tensor]] = []
        self.buffers: List[Tuple[str, torch.Tensor, torch.Tensor]] = []
        self.optim: Dict[str, Dict[str, torch.Tensor]] = {}

    def add(self, logical, name: str, key: str, dest: torch.Tensor, fqn: Callable[[str], str], saved: Dict) -> None:
        """Register `dest` (this rank's tensor for (name, key)) to be filled; `saved` is the checkpoint's
        metadata by key (a tensor with no box form is read whole and cut afterwards)."""
        pieces = pieces_of(logical, name, key, dest)
        if pieces is not None:
            self.state.update({fqn(n): p for n, p in pieces.items()})
            return
        md = saved[fqn(name)]
        full = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        self.state[fqn(name)] = LogicalTensor.whole(full)
        self.fallbacks.append((name, key, full, dest))

    def finish(self, logical) -> None:
        """Cut the tensors read whole into this rank's part (no communication)."""
        for name, key, full, dest in self.fallbacks:
            dest.copy_(logical.shard(name, full, key))


def load_targets(model, optimizer, logical, saved: Dict[str, TensorStorageMetadata]) -> LoadTargets:
    """The LogicalTensors a load fills on this rank: views of the parameters themselves (loaded in place), copies
    of the persistent buffers (compared after: they are derived from the seed), and optimizer state allocated
    as the optimizer would (shapes here, dtypes and keys from the checkpoint)."""
    targets = LoadTargets()
    params = dict(model.named_parameters())
    for name, t in model.state_dict().items():
        dest = t.detach()
        if name not in params:
            dest = dest.clone()
            targets.buffers.append((name, dest, t))
        targets.add(logical, name, "", dest, model_key, saved)
    for name, t in (getattr(logical, "logical_buffers", dict)() if logical is not None else {}).items():
        copy = torch.empty_like(t)
        targets.buffers.append((name, copy, t))
        targets.state[model_key(name)] = LogicalTensor.whole(copy)
    for name, p in params.items():
        first = logical_names(logical, name)[0]
        prefix = optim_key(first, "")
        keys = [k[len(prefix) :] for k in saved if k.startswith(prefix) and "/" not in k[len(prefix) :]]
        st = {}
        for key in keys:
            md = saved[prefix + key]
            # Zeros: a shard's padding (FSSDP, expert flats) is in no box, and the optimizer keeps it at zero.
            st[key] = torch.zeros(local_state_shape(optimizer, p, key, md), dtype=md.properties.dtype)
            targets.add(logical, name, key, st[key], lambda n, key=key: optim_key(n, key), saved)
        if st:
            targets.optim[name] = st
    return targets


def shard_bytes(state: Dict[str, LogicalTensor]) -> int:
    return sum(t.local_bytes for t in state.values())


def assign_writers(state: Dict[str, LogicalTensor], rank: int, world_size: int, group=None) -> Dict[str, LogicalTensor]:
    """This rank's part of `state` with every replicated chunk (held by several ranks: dp replicas, a tensor
    every rank gathered) kept by one holder only, the one with the fewest bytes assigned so far, largest chunks
    first; every rank computes the same assignment from everyone's chunk lists (one object all-gather). So a
    rank writes, and an asynchronous save stages, only what it writes. DCP would de-duplicate the same way,
    but only after staging."""
    mine = {
        fqn: [(off, tuple(v.shape), v.numel() * v.element_size()) for off, v in t.chunks] for fqn, t in state.items()
    }
    holders: Dict[Tuple, List[int]] = {}
    sizes: Dict[Tuple, int] = {}
    for r, theirs in enumerate(all_gather_obj(mine, world_size, group)):
        for fqn, chunks in theirs.items():
            for off, shape, nbytes in chunks:
                holders.setdefault((fqn, off, shape), []).append(r)
                sizes[(fqn, off, shape)] = nbytes
    load = [0] * world_size
    keep = set()
    for key in sorted(holders, key=lambda k: (-sizes[k], k)):
        writer = min(holders[key], key=lambda r: (load[r], r))
        load[writer] += sizes[key]
        if writer == rank:
            keep.add(key)
    out = {}
    for fqn, t in state.items():
        chunks = [(off, v) for off, v in t.chunks if (fqn, off, tuple(v.shape)) in keep]
        out[fqn] = LogicalTensor(t.shape, chunks, t.dtype)
    return out
