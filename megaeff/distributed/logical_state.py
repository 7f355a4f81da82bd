"""Logical views of a parallelized model: which parameters are shards, their logical shapes, and the gather /
shard of tensors shaped like them (values, gradients, optimizer state) between this rank's part and the
single-process tensor. Checkpoints go through here, so a run saved under one layout loads under any other.

A module that holds shards (the TP linear layers, the vocab-parallel embedding) answers `split_of(name)`
(rows | cols | support | replicated), `logical_shape(name)`, `gather(name, tensor)` (a collective over its tp
group) and `shard_logical(name, tensor)`; parameters of any other module are replicated.
"""

from __future__ import annotations

import math
from typing import Dict, NamedTuple

import torch
from torch import nn

from megaeff.distributed.comm import all_gather

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
    """Set `tp_split` and `logical_shape` on every parameter, for the consumers that see parameters only
    (gradient norm, optimizer). Call after materialization: moving off the meta device creates new Parameters."""
    layouts = param_layouts(model)
    for name, p in model.named_parameters():
        lay = layouts.get(name)
        p.tp_split = lay.spec if lay is not None else "replicated"
        p.logical_shape = tuple(lay.owner.logical_shape(lay.local_name)) if lay is not None else tuple(p.shape)


class LogicalState:
    """Converts tensors keyed by parameter name between shards and logical tensors.

    Tensors shaped like the parameter convert as the parameter does. FP8 optimizer metadata (`*_meta`, one row
    per 1x128 group) converts along its rows where the parameter is split by rows (the optimizer has checked
    that such shards hold whole groups); scalars and everything of a replicated parameter pass through."""

    def __init__(self, model: nn.Module):
        self.layouts = param_layouts(model)
        self.params = dict(model.named_parameters())

    @property
    def sharded(self) -> bool:
        return any(lay.spec in SHARDED for lay in self.layouts.values())

    def _layout(self, name: str):
        lay = self.layouts.get(name)
        return None if lay is None or lay.spec not in SHARDED else lay

    def _unsupported(self, name: str, key: str, lay: ParamLayout, tensor: torch.Tensor) -> ValueError:
        return ValueError(
            f"{name}: state {key!r} {tuple(tensor.shape)} of a {lay.spec}-split parameter has no layout-independent form"
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
        return {k: self.gather(k, v) for k, v in state.items()}

    def shard_model(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: self.shard(k, v) for k, v in state.items()}

    def gather_optimizer(self, saved: Dict) -> Dict:
        return {**saved, "state": {n: {k: self.gather(n, v, k) for k, v in st.items()} for n, st in saved["state"].items()}}

    def shard_optimizer(self, saved: Dict) -> Dict:
        return {**saved, "state": {n: {k: self.shard(n, v, k) for k, v in st.items()} for n, st in saved["state"].items()}}


def fp8_group_problem(p: torch.Tensor, group_size: int = 128) -> str:
    """Why this shard's 1x128 FP8 groups would differ from the logical tensor's ('' when they are the same)."""
    from megaeff.precision.group_quant import GroupLayout

    spec = getattr(p, "tp_split", "replicated")
    if spec not in SHARDED:
        return ""
    logical = GroupLayout.for_shape(getattr(p, "logical_shape", p.shape), group_size)
    if spec == "rows" and p.dim() >= 2 and (math.prod(p.shape[:-1]) % logical.rows_per_group) == 0:
        return ""
    if spec == "cols" and logical.rows_per_group == 1 and p.shape[-1] % group_size == 0:
        return ""
    what = {"rows": "its rows", "cols": f"its {p.shape[-1]} columns", "support": "its sparse values"}[spec]
    return f"the {spec}-split shard holds {what}, which do not tile into whole {group_size}-element groups of the logical tensor"
