"""Layout-independent state under FSSDP: tensors keyed by logical parameter name, gathered from and cut into
this rank's shards, composed with tensor parallelism.

`FSSDPState` reads the sharding plan (plan.py) and offers the interface of
`megaeff.distributed.logical_state.LogicalState` (`sharded`, `gather`, `shard`, `gather_model`, `shard_model`,
`gather_optimizer`, `shard_optimizer`; `local_pieces`, the boxes sharded checkpoints write with no gather; the
distributed experts' flat parameters, which the plan leaves to their owner, as `LogicalState` does), plus the whole
model and optimizer (`logical_state_dict`, `load_logical_state_dict`, `logical_optimizer_state`,
`load_logical_optimizer_state`). `FSSDP` (engine.py) exposes it, so the facade can be passed as `logical=` to the
checkpoint functions unchanged: the model's `state_dict()` and `named_parameters()` hold the shards under their
logical names, so the files hold exactly what a single-process run writes.

Two steps each way. Gather: the FSSDP shards of a parameter (or of a tensor shaped like it: gradient, AdamW
moments, COAT FP8 codes; or the rows of a COAT `*_meta` [n_groups, 3] tensor) are concatenated along dim 0 in
group-rank order into the tensor this layout computes with; then, for a tensor-parallel parameter, its tp
shards are gathered as `LogicalState` does. Shard: the reverse, with no communication. Scalars and the state of
replicated parameters pass through. These run at checkpoints, not per step: every tensor of a call travels in one
padded all-gather per shard group (as bytes, so FP8 codes cross gloo too).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megaeff.distributed.chunk_boxes import Pieces, placed, whole
from megaeff.distributed.comm import CommGroup, all_gather
from megaeff.distributed.fssdp.layout import TensorShard
from megaeff.distributed.logical_state import (
    ExpertViews,
    expert_owners,
    gather_cols_meta,
    meta_rows,
    shard_cols_meta,
    tp_placement,
)
from megaeff.distributed.optimizer_state import load_optimizer_state_by_name, optimizer_state_by_name
from megaeff.precision.group_quant import META_FIELDS


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # gloo has no FP8 dtypes: one-byte floats (COAT codes) travel as their bytes.
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def gather_rows_many(items: List[Tuple[torch.Tensor, List[int]]], cg: CommGroup) -> List[torch.Tensor]:
    """For each (t, sizes): every member's `t` (member q holds `sizes[q]` rows) concatenated along dim 0, in
    group-rank order. All of them travel as bytes in one all-gather, each slot padded to its largest member."""
    if not items:
        return []
    slots, offsets, off = [], [], 0
    for t, sizes in items:
        row = math.prod(t.shape[1:]) * t.element_size()
        slot = -(-max(sizes) * row // 8) * 8  # 8-byte aligned: every dtype views back in place
        offsets.append(off)
        slots.append((row, slot))
        off += slot
    send = torch.zeros(off, dtype=torch.uint8, device=items[0][0].device)
    for (t, _), o in zip(items, offsets):
        raw = t.contiguous().view(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
        send[o : o + raw.numel()] = raw
    recv = all_gather(send, cg, 0).view(cg.size, off)
    out = []
    for (t, sizes), o, (row, _) in zip(items, offsets, slots):
        pieces = [recv[q, o : o + n * row].clone().view(t.dtype).view(n, *t.shape[1:]) for q, n in enumerate(sizes)]
        out.append(torch.cat(pieces, dim=0))
    return out


class FSSDPState:
    """The logical view of a model sharded by `plan` (a ShardingPlan), read from it: `specs` (name ->
    TensorShard of the sharded parameters), `shard_cgs` (name -> the CommGroup it is sharded over), `tp_layouts`
    (name -> (owner module, local name, split)) of tensor-parallel parameters, `full_shapes` and `logical_shapes`
    (name -> shape, recorded before sharding) and `model`."""

    def __init__(self, plan):
        self.model = plan.model
        self.specs: Dict[str, TensorShard] = plan.specs
        self.shard_cgs: Dict[str, CommGroup] = plan.shard_cgs
        self.tp_layouts: Dict[str, tuple] = plan.tp_layouts
        self.full_shapes: Dict[str, tuple] = plan.full_shapes
        self.logical_shapes: Dict[str, tuple] = plan.logical_shapes
        # The distributed experts' flat parameters are left to their owner by the plan (ignored_params).
        self.experts = expert_owners(plan.model)
        self.expert_views = ExpertViews(self.experts)

    @property
    def sharded(self) -> bool:
        return bool(self.specs) or bool(self.tp_layouts)

    @staticmethod
    def _is_meta(key: str) -> bool:
        return key.endswith("_meta")

    def _unsupported(self, name: str, key: str, tensor: torch.Tensor, what: str) -> ValueError:
        return ValueError(
            f"{name}: state {key!r} {tuple(tensor.shape)} of a {what} parameter has no layout-independent form"
        )

    # ------------------------------------------------------------------ FSSDP step
    def _fs_plan(self, name: str, t, key: str) -> Optional[List[int]]:
        """Row counts of every member for a shard-shaped `t` of `name` (None: nothing to gather)."""
        spec = self.specs.get(name)
        if spec is None or not torch.is_tensor(t) or t.dim() == 0:
            return None
        meta_shape = (spec.group_counts[spec.me], META_FIELDS)
        if self._is_meta(key) and tuple(t.shape) == meta_shape:
            return list(spec.group_counts)
        if not self._is_meta(key) and tuple(t.shape) == spec.shape:
            return [b - a for a, b in spec.bounds]
        if not key and tuple(t.shape) == meta_shape:  # unnamed metadata rows
            return list(spec.group_counts)
        raise self._unsupported(name, key, t, "FSSDP-sharded")

    def _gather_all(self, entries: List[Tuple[str, str, object]]) -> List[object]:
        """(name, key, value) -> logical values: one all-gather per shard group for the FSSDP step, then the
        tensor-parallel step tensor by tensor."""
        out = [v for _, _, v in entries]
        by_group: Dict[str, list] = {}
        for i, (name, key, v) in enumerate(entries):
            sizes = self._fs_plan(name, v, key)
            if sizes is not None:
                by_group.setdefault(self.shard_cgs[name].name, []).append((i, v, sizes, self.shard_cgs[name]))
        for group in by_group.values():
            gathered = gather_rows_many([(v, sizes) for _, v, sizes, _ in group], group[0][3])
            for (i, _, _, _), g in zip(group, gathered):
                out[i] = g
        return [self._tp_gather(name, v, key) for (name, key, _), v in zip(entries, out)]

    def _fs_shard(self, name: str, t: torch.Tensor, key: str) -> torch.Tensor:
        spec = self.specs.get(name)
        if spec is None or not torch.is_tensor(t) or t.dim() == 0:
            return t
        meta_shape = (sum(spec.group_counts), META_FIELDS)
        if (
            self._is_meta(key)
            and tuple(t.shape) == meta_shape
            or not key
            and tuple(t.shape) == meta_shape != spec.full_shape
        ):
            g0, g1 = spec.group_range()
            return t[g0:g1].clone()
        if not self._is_meta(key) and tuple(t.shape) == spec.full_shape:
            return spec.cut(t).clone()
        raise self._unsupported(name, key, t, "FSSDP-sharded")

    # ------------------------------------------------------------------ tensor-parallel step (LogicalState's rule)
    def _tp_gather(self, name: str, t: torch.Tensor, key: str) -> torch.Tensor:
        lay = self.tp_layouts.get(name)
        if lay is None or not torch.is_tensor(t) or t.dim() == 0:
            return t
        owner, local, spec = lay
        if tuple(t.shape) == self.full_shapes[name] and not self._is_meta(key):
            out = owner.gather(local, _as_bytes(t))
            return out.view(t.dtype) if out.dtype != t.dtype else out
        if self._is_meta(key) and spec == "rows":
            return all_gather(t, owner.cg, 0)
        if self._is_meta(key) and spec == "cols":
            return gather_cols_meta(t, self.full_shapes[name][0], owner.cg)
        raise self._unsupported(name, key, t, f"{spec}-split")

    def _tp_shard(self, name: str, t: torch.Tensor, key: str) -> torch.Tensor:
        lay = self.tp_layouts.get(name)
        if lay is None or not torch.is_tensor(t) or t.dim() == 0:
            return t
        owner, local, spec = lay
        if tuple(t.shape) == self.logical_shapes[name] and not self._is_meta(key):
            return owner.shard_logical(local, t).clone()
        if self._is_meta(key) and spec == "rows":
            return t.chunk(owner.cg.size, 0)[owner.cg.rank].clone()
        if self._is_meta(key) and spec == "cols":
            return shard_cols_meta(t, self.full_shapes[name][0], owner.cg).clone()
        raise self._unsupported(name, key, t, f"{spec}-split")

    # ------------------------------------------------------------------ boxes (sharded checkpoints)
    def local_pieces(self, name: str, key: str, tensor: torch.Tensor) -> Optional[Dict[str, Pieces]]:
        """The boxes of logical tensors that this rank's `tensor` holds (no communication; see
        `parallel_model.LogicalState.local_pieces`): the dim-0 run `bounds[me]` of the tensor-parallel slice
        (`*_meta`: the group rows `group_range()`), placed at the slice's own offset in the logical tensor
        (`tp_placement`). None where the tp slice has no box form (logical_state's module docstring)."""
        if not torch.is_tensor(tensor):
            return None
        if name in self.experts:
            return self.experts[name].local_pieces(tensor)
        spec, lay = self.specs.get(name), self.tp_layouts.get(name)
        if tensor.dim() == 0 or spec is None and lay is None:
            return {name: whole(tensor)}
        meta = self._is_meta(key)
        what = "FSSDP-sharded" if spec is not None else f"{lay[2]}-split"
        logical = self.logical_shapes[name]
        if spec is None:
            expected = (meta_rows(self.full_shapes[name]), META_FIELDS) if meta else self.full_shapes[name]
            local = (0,) * tensor.dim()
        elif meta:
            expected, local = (spec.group_counts[spec.me], META_FIELDS), (spec.group_range()[0], 0)
        else:
            expected, local = spec.shape, (spec.bounds[spec.me][0],) + (0,) * (tensor.dim() - 1)
        if tuple(tensor.shape) != tuple(expected):
            raise self._unsupported(name, key, tensor, what)
        if lay is None:
            return {name: placed((meta_rows(logical), META_FIELDS) if meta else logical, local, tensor)}
        place = tp_placement(lay[0], lay[1], lay[2], meta, logical)
        if place is None:
            return None
        shape, offsets = place
        return {name: placed(shape, tuple(a + b for a, b in zip(offsets, local)), tensor)}

    def local_logical_names(self, name: str) -> List[str]:
        """The logical tensors a local state name covers: itself, or the experts' tensors of a flat parameter."""
        owner = self.experts.get(name)
        return owner.logical_names() if owner is not None else [name]

    def logical_buffers(self) -> Dict[str, torch.Tensor]:
        """As `logical_state.LogicalState.logical_buffers` (the distributed experts' index checksums)."""
        return {k: v for owner in self.experts.values() for k, v in owner.logical_buffers().items()}

    # ------------------------------------------------------------------ LogicalState's interface
    def gather(self, name: str, tensor: torch.Tensor, key: str = "") -> torch.Tensor:
        """The logical (single-process) tensor of `name`'s shard-shaped `tensor`; `key` names optimizer state
        (`*_meta`: COAT metadata rows). A collective over the shard group (and tp)."""
        return self._gather_all([(name, key, tensor)])[0]

    def shard(self, name: str, tensor: torch.Tensor, key: str = "") -> torch.Tensor:
        """This rank's part of a logical tensor of `name` (no communication)."""
        return self._fs_shard(name, self._tp_shard(name, tensor, key), key)

    gather_like = gather
    shard_like = shard

    def gather_model(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.expert_views.gather_model(
            state, lambda rest: dict(zip(rest, self._gather_all([(k, "", v) for k, v in rest.items()])))
        )

    def shard_model(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.expert_views.shard_model(state, lambda rest: {k: self.shard(k, v) for k, v in rest.items()})

    def gather_optimizer(self, saved: Dict) -> Dict:
        def rest(state):
            values = iter(self._gather_all([(n, k, v) for n, st in state.items() for k, v in st.items()]))
            return {n: {k: next(values) for k in st} for n, st in state.items()}

        return self.expert_views.gather_optimizer(saved, rest)

    def shard_optimizer(self, saved: Dict) -> Dict:
        """Every tensor a copy: the optimizer keeps what it is given and updates it in place (`step` += 1), so a
        tensor passed through (a scalar, a replicated parameter's state) must not stay shared with `saved`."""

        def own(n, k, v):
            out = self.shard(n, v, k)
            return out.clone() if out is v and torch.is_tensor(v) else out

        return self.expert_views.shard_optimizer(
            saved, lambda rest: {n: {k: own(n, k, v) for k, v in st.items()} for n, st in rest.items()}
        )

    # ------------------------------------------------------------------ whole model / optimizer
    def logical_state_dict(self) -> Dict[str, torch.Tensor]:
        """The single-process model's state dict, on every rank (a collective)."""
        return self.gather_model({k: v.detach() for k, v in self.model.state_dict().items()})

    def load_logical_state_dict(self, state: Dict[str, torch.Tensor], strict: bool = True):
        """Load a single-process state dict: every rank keeps its shards (no communication)."""
        return self.model.load_state_dict(self.shard_model(state), strict=strict)

    def logical_optimizer_state(self, optimizer: torch.optim.Optimizer) -> Dict:
        """The optimizer state keyed by logical name, every tensor logical (the checkpoint's optimizer.pt form)."""
        return self.gather_optimizer(optimizer_state_by_name(self.model, optimizer))

    def load_logical_optimizer_state(
        self, optimizer: torch.optim.Optimizer, saved: Dict, path: Optional[str] = None
    ) -> None:
        """Load a logical optimizer state (`logical_optimizer_state`'s form): every rank keeps its shards."""
        load_optimizer_state_by_name(self.model, optimizer, self.shard_optimizer(saved), Path(path or "<fssdp>"))
