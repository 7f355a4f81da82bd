"""Logical views of a parallelized model: which parameters are shards, their logical shapes, and the gather /
shard of tensors shaped like them (values, gradients, optimizer state) between this rank's part and the
single-process tensor. Checkpoints go through here, so a run saved under one layout loads under any other.

A module that holds shards (the TP linear layers, the vocab-parallel embedding) answers `split_of(name)`
(rows | cols | support | replicated), `logical_shape(name)`, `gather(name, tensor)` (a collective over its tp
group), `shard_logical(name, tensor)` and `shard_offset(name)` (where its slice starts in the logical tensor);
parameters of any other module are replicated.

Sharded checkpoints (torch.distributed.checkpoint) need no gather: `local_pieces` says which boxes of which
logical tensors a local tensor holds (megaeff/distributed/chunk_boxes.py), and each rank writes only those.
Tensors with no box form answer None (on every rank that holds them), and a checkpoint gathers them instead
(`gather`: over tp, and the FSSDP group where the tensor is sharded there too):
- SLTrain's sparse values of a row-parallel layer: a rank holds the entries in its columns of every row, not a
  run of the sorted support (a column-parallel layer's rows are one: a box). They are about the size of the
  low-rank factors, and COAT cannot keep them in FP8 under tp (their groups would straddle shards);
- the COAT metadata (`*_meta`, one row per 1x128 group, row-major over (row, column block)) of a cols-split
  parameter: a rank holds a run of column blocks of every row, one box per row of the parameter. Gathered, it
  is 3 floats per 128 elements.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from megaeff.distributed.chunk_boxes import Pieces, placed, whole
from megaeff.distributed.comm import CommGroup, all_gather
from megaeff.layers.param_meta import ParamMeta, param_meta, set_param_meta
from megaeff.precision.group_quant import META_FIELDS, GroupLayout

SHARDED = ("rows", "cols", "support")


class ParamLayout(NamedTuple):
    owner: nn.Module
    local_name: str
    spec: str


def param_layouts(model: nn.Module) -> Dict[str, ParamLayout]:
    """Every sharded-or-not parameter of a shard-holding module, by its full (logical) name."""
    out = {}
    for mname, module in model.named_modules():
        if hasattr(module, "split_of"):
            for pname, _ in module.named_parameters(recurse=False):
                out[f"{mname}.{pname}" if mname else pname] = ParamLayout(module, pname, module.split_of(pname))
    return out


def annotate_parameters(model: nn.Module) -> None:
    """Give every parameter its record (`ParamMeta`: tp split and logical shape), for the consumers that see
    parameters only (gradient norm, optimizer). Call after materialization: moving off the meta device creates new
    Parameters."""
    layouts = param_layouts(model)
    for name, p in model.named_parameters():
        lay = layouts.get(name)
        if lay is None:
            meta = ParamMeta(logical_shape=tuple(p.shape))
        else:
            meta = ParamMeta(tp_split=lay.spec, logical_shape=tuple(lay.owner.logical_shape(lay.local_name)))
        set_param_meta(p, meta)


def expert_owners(model: nn.Module) -> Dict[str, nn.Module]:
    """Flat expert parameters (megaeff/distributed/expert_parallel/experts.py) by full name -> the module that owns
    them."""
    out = {}
    for path, module in model.named_modules():
        if hasattr(module, "gather_logical") and hasattr(module, "flat_param_name"):
            out[f"{path}.{module.flat_param_name}"] = module
    return out


def meta_rows(shape: Sequence[int]) -> int:
    """Rows of COAT's `*_meta` of a tensor of `shape`: its number of 1x128 groups."""
    return GroupLayout.for_shape(tuple(shape)).n_groups


def tp_placement(
    owner: nn.Module, local_name: str, spec: str, meta: bool, logical_shape: Sequence[int]
) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """(logical shape, offsets) of this rank's tp slice of a `spec`-split parameter of `owner` (its value or a
    tensor shaped like it; with `meta`, its COAT metadata rows), or None where the slice is no box (see the
    module docstring). `*_meta` of a rows split is cut as `LogicalState.shard` cuts it: chunk(p, 0)[rank]."""
    logical = tuple(int(d) for d in logical_shape)
    if meta:
        if spec != "rows":
            return None
        n, cg = meta_rows(logical), owner.cg
        return (n, META_FIELDS), (min(cg.rank * -(-n // cg.size), n), 0)
    try:
        return logical, tuple(owner.shard_offset(local_name))
    except ValueError:  # a split with no offset (a row-parallel support)
        return None


def gather_cols_meta(meta: torch.Tensor, rows: int, cg: CommGroup) -> torch.Tensor:
    """The logical `*_meta` of a cols-split parameter with `rows` rows from every rank's: each rank holds the
    same number of column blocks of every row (the optimizer checked that its columns are whole groups)."""
    return all_gather(meta.reshape(rows, -1, META_FIELDS), cg, 1).reshape(-1, META_FIELDS)


def shard_cols_meta(meta: torch.Tensor, rows: int, cg: CommGroup) -> torch.Tensor:
    return meta.reshape(rows, -1, META_FIELDS).chunk(cg.size, 1)[cg.rank].reshape(-1, META_FIELDS)


class LogicalState:
    """Converts tensors keyed by parameter name between shards and logical tensors.

    Tensors shaped like the parameter convert as the parameter does. FP8 optimizer metadata (`*_meta`, one row
    per 1x128 group) converts along its rows where the parameter is split by rows (the optimizer has checked
    that such shards hold whole groups); scalars and everything of a replicated parameter pass through."""

    def __init__(self, model: nn.Module):
        self.layouts = param_layouts(model)
        self.params = dict(model.named_parameters())
        self.experts = expert_owners(model)
        self.expert_views = ExpertViews(self.experts)

    @property
    def sharded(self) -> bool:
        return bool(self.experts) or any(lay.spec in SHARDED for lay in self.layouts.values())

    def _layout(self, name: str):
        lay = self.layouts.get(name)
        return None if lay is None or lay.spec not in SHARDED else lay

    def _unsupported(self, name: str, key: str, lay: ParamLayout, tensor: torch.Tensor) -> ValueError:
        return ValueError(
            f"{name}: state {key!r} {tuple(tensor.shape)} of a {lay.spec}-split parameter has no "
            "layout-independent form"
        )

    def gather(self, name: str, tensor: torch.Tensor, key: str = "") -> torch.Tensor:
        lay = self._layout(name)
        if lay is None or not torch.is_tensor(tensor) or tensor.dim() == 0:
            return tensor
        if tensor.shape == self.params[name].shape:
            if tensor.is_floating_point() and tensor.element_size() == 1:  # COAT's FP8 codes: gloo has no FP8
                return lay.owner.gather(lay.local_name, tensor.view(torch.uint8)).view(tensor.dtype)
            return lay.owner.gather(lay.local_name, tensor)
        if key.endswith("_meta") and lay.spec == "rows":
            return all_gather(tensor, lay.owner.cg, 0)
        if key.endswith("_meta") and lay.spec == "cols":
            return gather_cols_meta(tensor, self.params[name].shape[0], lay.owner.cg)
        raise self._unsupported(name, key, lay, tensor)

    def shard(self, name: str, tensor: torch.Tensor, key: str = "") -> torch.Tensor:
        lay = self._layout(name)
        if lay is None or not torch.is_tensor(tensor) or tensor.dim() == 0:
            return tensor
        if tuple(tensor.shape) == tuple(lay.owner.logical_shape(lay.local_name)):
            return lay.owner.shard_logical(lay.local_name, tensor).clone()
        if key.endswith("_meta") and lay.spec == "rows":
            cg = lay.owner.cg
            return tensor.chunk(cg.size, 0)[cg.rank].clone()
        if key.endswith("_meta") and lay.spec == "cols":
            return shard_cols_meta(tensor, self.params[name].shape[0], lay.owner.cg).clone()
        raise self._unsupported(name, key, lay, tensor)

    def local_pieces(self, name: str, key: str, tensor: torch.Tensor) -> Optional[Dict[str, Pieces]]:
        """The boxes of logical tensors that this rank's `tensor` holds (no communication); see
        `parallel_model.LogicalState.local_pieces`. None: no box form (module docstring), gather it."""
        if not torch.is_tensor(tensor):
            return None
        owner = self.experts.get(name)
        if owner is not None:
            return owner.local_pieces(tensor)
        lay = self._layout(name)
        if tensor.dim() == 0 or lay is None:
            return {name: whole(tensor)}
        meta = key.endswith("_meta")
        if not meta and tensor.shape != self.params[name].shape:
            raise self._unsupported(name, key, lay, tensor)
        place = tp_placement(lay.owner, lay.local_name, lay.spec, meta, lay.owner.logical_shape(lay.local_name))
        if place is None:
            return None
        logical, offsets = place
        if meta and tensor.shape[0] != min(-(-logical[0] // lay.owner.cg.size), logical[0] - offsets[0]):
            raise self._unsupported(name, key, lay, tensor)
        return {name: placed(logical, offsets, tensor)}

    def local_logical_names(self, name: str) -> List[str]:
        """The logical tensors a local state name covers: itself, or the experts' tensors of a flat parameter."""
        owner = self.experts.get(name)
        return owner.logical_names() if owner is not None else [name]

    def logical_buffers(self) -> Dict[str, torch.Tensor]:
        """Persistent buffers of the single-process state dict that this rank's state dict lacks (the distributed
        experts' index checksums), by logical name; identical on every rank. A load compares them (a difference
        means another seed or shape) rather than writing them."""
        return {k: v for owner in self.experts.values() for k, v in owner.logical_buffers().items()}

    def gather_model(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.expert_views.gather_model(state, lambda rest: {k: self.gather(k, v) for k, v in rest.items()})

    def shard_model(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.expert_views.shard_model(state, lambda rest: {k: self.shard(k, v) for k, v in rest.items()})

    def gather_optimizer(self, saved: Dict) -> Dict:
        return self.expert_views.gather_optimizer(
            saved, lambda rest: {n: {k: self.gather(n, v, k) for k, v in st.items()} for n, st in rest.items()}
        )

    def shard_optimizer(self, saved: Dict) -> Dict:
        return self.expert_views.shard_optimizer(
            saved, lambda rest: {n: {k: self.shard(n, v, k) for k, v in st.items()} for n, st in rest.items()}
        )


class ExpertViews:
    """The distributed experts' part of the logical views: each flat expert parameter (and its optimizer state)
    <-> one logical tensor per expert tensor, plus the experts' persistent buffers. The other tensors go through
    the caller's functions (`rest`), so that every LogicalState implementation shares this."""

    def __init__(self, experts: Dict[str, nn.Module]):
        self.experts = experts

    def gather_model(self, state: Dict, rest: Callable[[Dict], Dict]) -> Dict:
        out = rest({k: v for k, v in state.items() if k not in self.experts})
        for k, v in state.items():
            owner = self.experts.get(k)
            if owner is not None:
                out.update(owner.gather_logical(v))
                out.update(owner.logical_buffers())
        return out

    def shard_model(self, state: Dict, rest: Callable[[Dict], Dict]) -> Dict:
        state = dict(state)
        out = {}
        for flat, owner in self.experts.items():
            for k, v in owner.logical_buffers().items():
                saved = state.pop(k, None)
                if saved is not None and not torch.equal(saved, v):
                    raise ValueError(f"{k}: the checkpoint's experts were built from another seed or shape")
            names = owner.logical_names()
            missing = [n for n in names if n not in state]
            if missing:
                raise ValueError(f"no tensors for {missing[:3]} (the experts of {flat})")
            out[flat] = owner.shard_logical({n: state.pop(n) for n in names})
        out.update(rest(state))
        return out

    @staticmethod
    def _state_by_logical(owner: nn.Module, st: Dict) -> Dict[str, Dict]:
        """One flat parameter's optimizer state, split into its logical tensors' (one per expert tensor)."""
        parts = {k: owner.gather_logical(v) for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
        scalars = {k: v for k, v in st.items() if k not in parts}
        # Each logical tensor gets its own copy of the scalars (AdamW's `step` is a tensor it increments in place;
        # shared, it would count once per expert tensor after a load).
        return {
            n: {
                **{k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()},
                **{k: part[n] for k, part in parts.items()},
            }
            for n in owner.logical_names()
        }

    def gather_optimizer(self, saved: Dict, rest: Callable[[Dict], Dict]) -> Dict:
        state = rest({n: st for n, st in saved["state"].items() if n not in self.experts})
        for n, st in saved["state"].items():
            if n in self.experts:
                state.update(self._state_by_logical(self.experts[n], st))
        hparams = [
            dict(
                g,
                names=[m for n in g["names"] for m in (self.experts[n].logical_names() if n in self.experts else [n])],
            )
            for g in saved["hparams"]
        ]
        return {**saved, "hparams": hparams, "state": state}

    def shard_optimizer(self, saved: Dict, rest: Callable[[Dict], Dict]) -> Dict:
        state = dict(saved["state"])
        out = {}
        for flat, owner in self.experts.items():
            names = owner.logical_names()
            if names[0] not in state:
                continue  # no state yet for these experts (a checkpoint saved before the first step)
            pieces = [state.pop(n) for n in names]
            keys = [k for k, v in pieces[0].items() if torch.is_tensor(v) and v.dim() > 0]
            out[flat] = {
                # Copies: the optimizer updates its scalars in place (`step`), they must not stay shared with `saved`.
                **{k: v.clone() if torch.is_tensor(v) else v for k, v in pieces[0].items() if k not in keys},
                **{k: owner.shard_logical({n: p[k] for n, p in zip(names, pieces)}) for k in keys},
            }
        out.update(rest(state))
        logical = {n: flat for flat, owner in self.experts.items() for n in owner.logical_names()}
        hparams = []
        for g in saved["hparams"]:
            names = []
            for n in g["names"]:
                n = logical.get(n, n)
                if n not in names:
                    names.append(n)
            hparams.append(dict(g, names=names))
        return {**saved, "hparams": hparams, "state": out}


def fp8_group_problem(p: torch.Tensor, group_size: int = 128) -> str:
    """Why this shard's 1x128 FP8 groups would differ from the logical tensor's ('' when they are the same)."""
    from megaeff.precision.group_quant import shard_group_problem

    meta = param_meta(p)
    return shard_group_problem(tuple(p.shape), meta.logical_shape, meta.tp_split, group_size)
