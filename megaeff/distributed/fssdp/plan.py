"""FSSDP's sharding plan, built once: which tensors are sharded over which group, the units they travel in, and
the order units are prefetched in. Building it replaces the model's parameters by this rank's shards.

What is sharded. The trainable tensors of a sparse-plus-low-rank model are already compact (low-rank factors,
SLTrain's sparse values, LOST's channel block); FSSDP shards exactly those, never a dense weight and never an
index (SLTrain supports and LOST channel sets are buffers regenerated from the seed on every rank). Each rank
keeps its dim-0 run of every tensor as a real `nn.Parameter` registered in place of the original under the same
logical name, so the optimizer built from the model sees the shards, and params + grads + optimizer state take
1/dp of the memory (plus what stays replicated). The rule that keeps COAT's FP8 groups whole, the padding and
the flat buffers are in layout.py.

Units. Each `Block` of `model.layers` is a unit, and everything else (final norm, head; the embedding when it
cannot take the sparse path) one more, the rest-unit. A unit's tensors travel together: one all-gather before
the unit computes, one reduce-scatter of its gradients. The embedding gathers only the rows of the batch's tokens
from their owners and sends only their gradients back (embedding.py; `sparse_embedding`): the plan lists it as an
`EmbeddingSite` instead of putting it in a unit.

Heterogeneous sharding. Tensors below `replicate_below` elements, and the norm gains with `replicate_norms`,
are replicated within a node of `node_size` consecutive dp_cp ranks (CPU tests emulate nodes by these rank
ranges; 0: the launcher's local world size / tp, megaeff/distributed/launch.py) and sharded across nodes
(kind "hybrid"): gathered over the cross-node group (`cross_cg`), their gradients reduce-scattered there and the
result all-reduced within the node (`node_cg`). With one node they are simply replicated. Replicated tensors (by
this policy, or too small to split into whole groups, see layout.py) keep their original parameter.

Every parameter's record (`ParamMeta`, megaeff/layers/param_meta.py) gets its dp fields, for gradient clipping
(megaeff/distributed/grad_norm.py): `dp_split` (replicated | rows) and `dp_replicas` (how many dp_cp ranks hold
the same values); a shard copies the tp fields of the parameter it replaces.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Tuple

import torch.distributed as dist
from torch import nn

from megaeff.distributed.comm import CommGroup
from megaeff.distributed.fssdp.embedding import eligible
from megaeff.distributed.fssdp.layout import GATHER_DTYPES, REDUCE_DTYPES, FlatGroup, TensorShard, dim0_bounds
from megaeff.distributed.fssdp.units import Unit
from megaeff.distributed.launch import local_world_size as launcher_local_world_size
from megaeff.distributed.logical_state import SHARDED, param_layouts
from megaeff.layers.norm import RMSNorm
from megaeff.layers.param_meta import ParamMeta, has_param_meta, param_meta, set_param_meta

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims


@dataclass(frozen=True)
class FSSDPOptions:
    """The knobs of one FSSDP (see `FSSDP` in engine.py and the module docstrings of plan, engine, grad_sync)."""

    reshard_after_forward: bool = True
    gather_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    replicate_below: int = 0
    node_size: int = 0
    replicate_norms: bool = True
    sparse_embedding: bool = True
    defer_accumulation: bool = False
    max_inflight: int = 2
    group: str = "dp_cp"

    def check(self) -> None:
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.gather_dtype not in GATHER_DTYPES or self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(
                f"FSSDP gather dtype {self.gather_dtype!r} / reduce dtype {self.reduce_dtype!r}: "
                f"expected one of {', '.join(GATHER_DTYPES)} / {', '.join(REDUCE_DTYPES)}"
            )


class EmbeddingSite(NamedTuple):
    """An embedding table that takes the sparse path (embedding.py): its module, shard layout, shard and group."""

    module: nn.Module
    spec: TensorShard
    param: nn.Parameter
    cg: CommGroup


def resolve_node_size(node_size: int, dp: int, tp: int = 1, local_world_size: Optional[int] = None) -> int:
    """A node's size in dp_cp ranks. 0: the launcher's local world size (`local_world_size`; None: read from the
    launcher's environment) over tp (tp is the innermost axis, so a node of L consecutive ranks holds L / tp
    consecutive members of each dp_cp group), else one node."""
    if node_size < 0:
        raise ValueError(f"node_size must be >= 0, got {node_size}")
    if node_size == 0:
        local = launcher_local_world_size() if local_world_size is None else int(local_world_size)
        node_size = local // max(1, tp) or dp
    node_size = min(node_size, dp)
    if dp % node_size:
        raise ValueError(f"FSSDP node_size {node_size} does not divide the dp_cp degree {dp}")
    return node_size


def mark(p: nn.Parameter, split: str, replicas: int, meta: Optional[ParamMeta] = None) -> None:
    """Set the dp fields of `p`'s record (of `meta`'s tp fields when given, else its own): for gradient clipping,
    how many dp_cp ranks hold the same values of this tensor."""
    set_param_meta(p, replace(param_meta(p) if meta is None else meta, dp_split=split, dp_replicas=replicas))


class ShardingPlan:
    """Shards `model`'s parameters over `dims`' `options.group` (see the module docstring). Read by the engine
    (units, prefetch order, hook sites), the gradient sync (units, replicated / hybrid tensors, groups) and the
    logical state (specs, shard groups, shapes). `ignored_params` are left to their owner."""

    def __init__(
        self,
        model: nn.Module,
        dims: ParallelDims,
        options: FSSDPOptions,
        ignored_params=(),
        local_world_size: Optional[int] = None,
    ):
        if any(p.is_meta for p in model.parameters()):
            raise ValueError("FSSDP needs a materialized model (megaeff.models.init.materialize first)")
        options.check()
        self.model, self.dims, self.options = model, dims, options
        self.cg: CommGroup = dims.comm(options.group)
        dp = self.cg.size
        self.node_size = resolve_node_size(int(options.node_size), dp, dims.tp, local_world_size)
        self.n_nodes = dp // self.node_size
        ignored = {id(p) for p in ignored_params}

        # Recorded before any parameter is replaced: the tp layout and both shapes of every parameter.
        self.tp_layouts = {
            n: (lay.owner, lay.local_name, lay.spec) for n, lay in param_layouts(model).items() if lay.spec in SHARDED
        }
        named = dict(model.named_parameters())
        self.full_shapes = {n: tuple(p.shape) for n, p in named.items()}
        self.logical_shapes = {n: self._logical_shape(n, p) for n, p in named.items()}
        self.specs: Dict[str, TensorShard] = {}
        self.shard_cgs: Dict[str, CommGroup] = {}
        self.units: List[Unit] = []  # the units that hold tensors: blocks in order, then the rest-unit
        self.block_units: List[Unit] = []  # one per block of model.layers, empty ones included
        self.blocks: List[nn.Module] = []
        self.rest: Optional[Unit] = None
        self.rest_modules: List[nn.Module] = []  # the modules computing with the rest-unit's tensors, in forward order
        self.replicated: List[Tuple[str, nn.Parameter]] = []
        self.hybrid: List[Tuple[str, nn.Parameter]] = []
        self.embedding_sites: List[EmbeddingSite] = []
        self.node_cg, self.cross_cg = self._hybrid_groups(dims, options.group)
        self.enabled = dp > 1
        for p in named.values():
            if id(p) not in ignored:
                mark(p, "replicated", dp)
        if self.enabled:
            self._build_units(model, named, ignored)

    # ------------------------------------------------------------------ construction
    def _logical_shape(self, name: str, p: nn.Parameter) -> tuple:
        lay = self.tp_layouts.get(name)
        shape = param_meta(p).logical_shape if has_param_meta(p) else None
        if not shape:
            shape = lay[0].logical_shape(lay[1]) if lay is not None else p.shape
        return tuple(shape)

    def _hybrid_groups(self, dims, group: str):
        """(within-node, across-node) CommGroups; None where a group would have one rank. `new_group` is
        collective over the world, so every rank creates every dp_cp group's subgroups, in one order."""
        ns, nn_ = self.node_size, self.n_nodes
        if not (1 < nn_ < self.cg.size) or self.cg.group is None:
            return None, None
        mine_node = mine_cross = None
        for members in dims.group_ranks(group):
            nodes = [members[k * ns : (k + 1) * ns] for k in range(nn_)]
            crosses = [[members[j + k * ns] for k in range(nn_)] for j in range(ns)]
            for ranks in nodes + crosses:
                grp = dist.new_group(ranks)
                if dims.rank in ranks:
                    if ranks in nodes:
                        mine_node = CommGroup(f"{group}_node", grp, dims.comm_stats, ns, ranks.index(dims.rank))
                    else:
                        mine_cross = CommGroup(f"{group}_cross", grp, dims.comm_stats, nn_, ranks.index(dims.rank))
        return mine_node, mine_cross

    def _sites(self, model: nn.Module, blocks: List[nn.Module]):
        """Every place a parameter is registered, the units of the modules holding it (block index; len(blocks):
        the rest-unit), and whether its (last) holder is an RMSNorm."""
        block_ids = {id(b): i for i, b in enumerate(blocks)}
        sites: Dict[int, List[Tuple[nn.Module, str]]] = defaultdict(list)
        unit_of: Dict[int, set] = defaultdict(set)
        is_norm: Dict[int, bool] = {}
        stack: List[Tuple[nn.Module, int]] = [(model, len(blocks))]
        seen = set()
        while stack:
            module, u = stack.pop(0)
            if id(module) in seen:
                continue
            seen.add(id(module))
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                sites[id(p)].append((module, pname))
                unit_of[id(p)].add(u)
                is_norm[id(p)] = isinstance(module, RMSNorm)
            for child in module.children():
                stack.append((child, block_ids.get(id(child), u)))
        return sites, unit_of, is_norm

    def _shard(self, name: str, p: nn.Parameter, hybrid: bool, where) -> Optional[tuple]:
        """Replace `p` at every site by this rank's shard; None (and `p` listed as replicated) when it stays whole."""
        shape = tuple(p.shape)
        cg = (self.cross_cg if self.cross_cg is not None else self.cg) if hybrid and self.n_nodes > 1 else self.cg
        bounds = dim0_bounds(shape, self.n_nodes if hybrid else self.cg.size)
        if bounds is None:
            self.replicated.append((name, p))
            return None
        kind = "hybrid" if cg is self.cross_cg else "shard"
        spec = TensorShard(name, kind, shape, self.logical_shapes[name], p.dtype, bounds, cg.rank)
        shard = nn.Parameter(spec.cut(p.detach()).clone())
        meta = replace(param_meta(p), logical_shape=self.logical_shapes[name])  # the tp fields of the original
        mark(shard, "rows", self.node_size if kind == "hybrid" else 1, meta)
        for module, pname in where:
            module._parameters[pname] = shard
        self.specs[name], self.shard_cgs[name] = spec, cg
        if kind == "hybrid":
            self.hybrid.append((name, shard))
        return kind, spec, shard

    def _build_units(self, model: nn.Module, named: Dict[str, nn.Parameter], ignored) -> None:
        layers = getattr(model, "layers", None)
        blocks = list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers or [])
        sites, unit_of, is_norm = self._sites(model, blocks)
        units = [Unit(f"layers.{i}", False) for i in range(len(blocks))] + [Unit("rest", True)]
        groups: Dict[int, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
        opts = self.options
        for name, p in named.items():
            if len(unit_of[id(p)]) > 1:
                raise ValueError(
                    f"FSSDP: parameter {name} is shared by two units; sharing across blocks is not supported"
                )
            if not p.requires_grad or id(p) in ignored:
                continue
            u = next(iter(unit_of[id(p)]))
            hybrid = p.numel() < opts.replicate_below or (opts.replicate_norms and is_norm[id(p)])
            where = list(sites[id(p)])
            done = self._shard(name, p, hybrid, where)
            if done is None:
                continue
            kind, spec, shard = done
            sparse = opts.sparse_embedding and u == len(blocks) and kind == "shard" and len(where) == 1
            if sparse and eligible(where[0][0]):
                self.embedding_sites.append(EmbeddingSite(where[0][0], spec, shard, self.shard_cgs[name]))
                continue
            groups[u][kind].append((spec, shard, where))
        for u, unit in enumerate(units):
            for kind in ("shard", "hybrid"):
                entries = groups[u].get(kind)
                if not entries:
                    continue
                cg = self.cg if kind == "shard" else self.cross_cg
                unit.flats.append(FlatGroup([e[0] for e in entries], cg, opts.gather_dtype, opts.reduce_dtype))
                for _, shard, where in entries:
                    unit.params.append(shard)
                    unit.sites.append(where)
        self.units = [u for u in units if u.params]
        self.blocks, self.block_units, self.rest = blocks, units[:-1], units[-1]
        self._order_prefetch()

    def _order_prefetch(self) -> None:
        """Link each unit to the one whose gather to prefetch when it starts, and list the rest-unit's modules."""
        live = [u for u in self.block_units if u.params]
        for a, b in zip(live, live[1:]):
            a.next = b
        rest, blocks = self.rest, self.blocks
        if not rest.params:
            return
        order = {id(m): k for k, m in enumerate(self.model.modules())}
        held = {id(m): m for where in rest.sites for m, _ in where}  # modules computing with the gathered tensors
        mods = sorted(held.values(), key=lambda m: (m is self.model, order[id(m)]))
        first_block = order[id(blocks[0])] if blocks else None
        # The rest-unit starts the forward (a dense-gathered embedding) when its first module precedes the blocks,
        # and is prefetched behind the last block when it only follows them (norm, head).
        if live and first_block is not None and order[id(mods[0])] < first_block and mods[0] is not self.model:
            rest.next = live[0]
        elif live:
            live[-1].next = rest
        self.rest_modules = mods

    # ------------------------------------------------------------------ sizes
    def gather_bytes_per_pass(self) -> int:
        """Bytes one gather of every unit records (payload, padding included)."""
        return sum(f.gather_bytes for u in self.units for f in u.flats if f.cg.size > 1)

    def padding_numel(self) -> int:
        return sum(s.padding_numel for s in self.specs.values())

    def first_block(self) -> Optional[Unit]:
        """The first block that holds tensors (None: none does)."""
        return next((u for u in self.units if not u.is_rest), None)
