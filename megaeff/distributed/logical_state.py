"""Logical views of a parallelized model: which parameters are shards, their logical shapes, and the gather /
shard of tensors shaped like them (values, gradients, optimizer state) between this rank's part and the
single-process tensor. Checkpoints go through here, so a run saved under one layout loads under any other.

A module that holds shards (the TP linear layers, the vocab-parallel embedding) answers `split_of(name)`
(rows | cols | support | replicated), `logical_shape(name)`, `gather(name, tensor)` (a collective over its tp
group) and `shard_logical(name, tensor)`; parameters of any other module are replicated.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import torch
from torch import nn

from megaeff.distributed.comm import all_gather
from megaeff.layers.param_meta import ParamMeta, param_meta, set_param_meta

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


def _expert_buffers(owner: nn.Module) -> Dict[str, torch.Tensor]:
    """The experts' persistent buffers (index checksums) under their logical names: the single-process model
    holds them in its state dict, the distributed experts keep them in per-expert templates."""
    out = {}
    for e, template in enumerate(owner._templates):
        params = dict(template.named_parameters())  # meta placeholders: the values live in the flat parameter
        out.update({f"{owner.prefix}.experts.{e}.{k}": v for k, v in template.state_dict().items() if k not in params})
    return out


class LogicalState:
    """Converts tensors keyed by parameter name between shards and logical tensors.

    Tensors shaped like the parameter convert as the parameter does. FP8 optimizer metadata (`*_meta`, one row
    per 1x128 group) converts along its rows where the parameter is split by rows (the optimizer has checked
    that such shards hold whole groups); scalars and everything of a replicated parameter pass through."""

    def __init__(self, model: nn.Module):
        self.layouts = param_layouts(model)
        self.params = dict(model.named_parameters())
        self.experts = expert_owners(model)

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
            return lay.owner.gather(lay.local_name, tensor)
        if key.endswith("_meta") and lay.spec == "rows":
            return all_gather(tensor, lay.owner.cg, 0)
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
        raise self._unsupported(name, key, lay, tensor)

    def gather_model(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = {}
        for k, v in state.items():
            owner = self.experts.get(k)
            if owner is None:
                out[k] = self.gather(k, v)
            else:
                out.update(owner.gather_logical(v))
                out.update(_expert_buffers(owner))
        return out

    def shard_model(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        state = dict(state)
        out = {}
        for flat, owner in self.experts.items():
            for k, v in _expert_buffers(owner).items():
                saved = state.pop(k, None)
                if saved is not None and not torch.equal(saved, v):
                    raise ValueError(f"{k}: the checkpoint's experts were built from another seed or shape")
            names = owner.logical_names()
            missing = [n for n in names if n not in state]
            if missing:
                raise ValueError(f"no tensors for {missing[:3]} (the experts of {flat})")
            out[flat] = owner.shard_logical({n: state.pop(n) for n in names})
        out.update({k: self.shard(k, v) for k, v in state.items()})
        return out

    def _state_by_logical(self, name: str, st: Dict) -> Dict[str, Dict]:
        """One parameter's optimizer state, split into the logical tensors it covers (experts: one per tensor)."""
        owner = self.experts.get(name)
        if owner is None:
            return {name: {k: self.gather(name, v, k) for k, v in st.items()}}
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

    def gather_optimizer(self, saved: Dict) -> Dict:
        state = {}
        for n, st in saved["state"].items():
            state.update(self._state_by_logical(n, st))
        hparams = [
            dict(
                g,
                names=[m for n in g["names"] for m in (self.experts[n].logical_names() if n in self.experts else [n])],
            )
            for g in saved["hparams"]
        ]
        return {**saved, "hparams": hparams, "state": state}

    def shard_optimizer(self, saved: Dict) -> Dict:
        state = dict(saved["state"])
        out = {}
        for flat, owner in self.experts.items():
            names = owner.logical_names()
            if names[0] not in state:
                continue  # no state yet for these experts (a checkpoint saved before the first step)
            pieces = [state.pop(n) for n in names]
            keys = [k for k, v in pieces[0].items() if torch.is_tensor(v) and v.dim() > 0]
            out[flat] = {
                **{k: v for k, v in pieces[0].items() if k not in keys},
                **{k: owner.shard_logical({n: p[k] for n, p in zip(names, pieces)}) for k in keys},
            }
        out.update({n: {k: self.shard(n, v, k) for k, v in st.items()} for n, st in state.items()})
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
