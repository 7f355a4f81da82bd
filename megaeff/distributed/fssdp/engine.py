"""Fully sharded sparse data parallelism (FSSDP): the *compact* training state sharded over dp x cp.

What is sharded. The trainable tensors of a sparse-plus-low-rank model are already compact (low-rank factors,
SLTrain's sparse values, LOST's channel block); FSSDP shards exactly those, never a dense weight and never an
index (SLTrain supports and LOST channel sets are buffers regenerated from the seed on every rank). Each rank
keeps its dim-0 run of every tensor as a real `nn.Parameter` registered in place of the original under the same
logical name, so the optimizer built from the model sees the shards, and params + grads + optimizer state take
1/dp of the memory (plus what stays replicated). The rule that keeps COAT's FP8 groups whole, the padding and
the flat buffers are in megaeff/distributed/fssdp/layout.py.

Units. Each `Block` of `model.layers` is a unit, and everything else (final norm, head; the embedding when it
cannot take the sparse path) one more. A unit's tensors travel together: one all-gather before the unit
computes, one reduce-scatter of its gradients. The embedding gathers only the rows of the batch's tokens from
their owners and sends only their gradients back (megaeff/distributed/fssdp/embedding.py, `sparse_embedding`).

Forward. A forward pre-hook gathers the unit (or takes the gather prefetched while the previous unit computed)
and exposes the full tensors to the unit's modules as plain instance attributes (`module.__dict__[name]`, which
Python finds before nn.Module's `_parameters`), produced by one autograd Function whose backward is the
reduce-scatter. The next unit's gather is launched asynchronously at once. With `reshard_after_forward=True`
the post-hook frees the gathered storage: autograd still holds the tensor objects it saved, their memory is
gone, and the hook on the unit's output gradient refills the same storage (gathered again, prefetching the
unit before it) just before the unit's backward runs. The rest-unit is never resharded after forward: its head
runs last in forward and first in backward, so it would be gathered again at once (torch FSDP2 does the same
for its root). A gathered tensor lives from its unit's forward (or re-gather) to the end of its backward.

Backward. The Function's backward runs once every gradient of the unit has arrived; it launches the
reduce-scatter asynchronously (at most `max_inflight` in flight, the oldest waited for first) and frees the
gathered storage. Gradients are *summed*, never averaged: the trainer already divides the loss by the global
token count. By default each micro-batch is reduce-scattered on its own and added into the shard's `.grad`
(FSDP2's default): gradients only ever take 1/dp, but the sum over ranks and micro-batches is added in another
order than DP's (local sum first), which AdamW can amplify where a gradient element nearly cancels.
`defer_accumulation=True` sums the micro-batches locally, unsharded, and reduce-scatters once in the final
one (`prepare(final=...)`, FSDP2's no-sync): DP's order, full compact gradients held through the accumulation.

Heterogeneous sharding. Tensors below `replicate_below` elements, and the norm gains with `replicate_norms`,
are replicated within a node of `node_size` consecutive dp_cp ranks (CPU tests emulate nodes by these rank
ranges; 0: the launcher's LOCAL_WORLD_SIZE / tp) and sharded across nodes: they are gathered
over the cross-node group (`dp_cp_cross`), their gradients reduce-scattered there and the result all-reduced
within the node (`dp_cp_node`) in `finish()`: the sum over every rank, at 1/n_nodes of the all-reduce volume.
With one node they are simply replicated. Replicated tensors (by this policy, or too small to split into whole
groups, see fssdp_layout) keep their original parameter, and their gradient is all-reduced over dp_cp in
`finish()`.

One step (the trainer's order; GradReducer is not used with FSSDP):

    optimizer.zero_grad(set_to_none=True)
    for i, mb in enumerate(micro_batches):
        fs.prepare(final=i == len(micro_batches) - 1)   # matters only with defer_accumulation
        (loss(mb) / global_tokens).backward()   # reduce-scatters run during each backward
    fs.finish()                                 # wait for them, reduce replicated / hybrid gradients
    norm = clip_grad_norm_(list(fs.parameters()), max_norm, dims, dp_sharded=True)   # megaeff/distributed/grad_norm.py
    optimizer.step()

Every collective goes through megaeff/distributed/comm.py and is counted in `dims.comm_stats` (dp_cp/all_gather,
dp_cp/reduce_scatter, dp_cp/all_reduce; the embedding's dp_cp/sparse_all_gather, dp_cp/sparse_reduce_scatter and
dp_cp/all_to_all of token ids; the hybrid groups' dp_cp_cross/* and dp_cp_node/all_reduce); `last_step` holds
this object's own totals between two `finish()` calls, `last_gathers` how many unit gathers were prefetched
(overlapped with compute) or waited for. Gathered tensors are not model parameters, so
megaeff/precision/saved_bytes.py counts the ones autograd saves as activations (their storage is freed after
forward when resharding). A dp_cp group of one is a no-op. Not supported: activation checkpointing that re-runs
a unit's forward inside backward, a second backward through one graph (retain_graph), a parameter shared by
two units.
"""

from __future__ import annotations

import weakref
from collections import defaultdict, deque
from functools import partial
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten

from megaeff.distributed.comm import CommGroup, all_reduce_
from megaeff.distributed.fssdp.embedding import SparseRows, eligible
from megaeff.distributed.fssdp.layout import GATHER_DTYPES, REDUCE_DTYPES, FlatGroup, TensorShard, dim0_bounds
from megaeff.distributed.fssdp.state import LogicalStateMixin
from megaeff.distributed.fssdp.units import GatherUnit, Instance, Pending, Unit, resolve_node_size
from megaeff.distributed.logical_state import SHARDED, param_layouts
from megaeff.layers.norm import RMSNorm


class FSSDP(LogicalStateMixin):
    """Shard `model` over `dims`' `group` (dp_cp). See the module docstring for the step.

    Call it on the materialized (possibly tensor-parallel) model after `annotate_parameters` (the shards copy
    `tp_split` and `logical_shape`; annotating again afterwards would give them their own shapes) and before
    the optimizer is built, from `model` or `parameters()` (the same tensors). `ignored_params` are left to
    their owner (e.g. expert FSSDP's `expert_shards`): not sharded, not reduced, not marked; the owner sets
    `fssdp_replicas` (how many dp_cp ranks hold the same values) for `clip_grad_norm_`. Options: see the module
    docstring; `replicate_norms` puts the RMSNorm gains under the heterogeneous rule (with the default single
    node: replicated), `max_inflight` bounds the reduce-scatters in flight."""

    def __init__(
        self,
        model: nn.Module,
        dims,
        *,
        reshard_after_forward: bool = True,
        gather_dtype: str = "fp32",
        reduce_dtype: str = "fp32",
        replicate_below: int = 0,
        node_size: int = 0,
        replicate_norms: bool = True,
        ignored_params: Iterable[nn.Parameter] = (),
        sparse_embedding: bool = True,
        defer_accumulation: bool = False,
        max_inflight: int = 2,
        group: str = "dp_cp",
    ):
        if any(p.is_meta for p in model.parameters()):
            raise ValueError("FSSDP needs a materialized model (megaeff.models.init.materialize first)")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if gather_dtype not in GATHER_DTYPES or reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"FSSDP gather dtype {gather_dtype!r} / reduce dtype {reduce_dtype!r}: expected one of "
                             f"{', '.join(GATHER_DTYPES)} / {', '.join(REDUCE_DTYPES)}")
        self.model, self.dims = model, dims
        self.cg: CommGroup = dims.comm(group)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.gather_dtype, self.reduce_dtype = gather_dtype, reduce_dtype
        self.replicate_below, self.replicate_norms = int(replicate_below), bool(replicate_norms)
        self.max_inflight = int(max_inflight)
        self.defer_accumulation = bool(defer_accumulation)
        self.sparse_embedding = bool(sparse_embedding)
        self._final = True
        dp = self.cg.size
        self.node_size = resolve_node_size(int(node_size), dp, dims.tp)
        self.n_nodes = dp // self.node_size
        ignored = {id(p) for p in ignored_params}

        # Recorded before any parameter is replaced: the tp layout and both shapes of every parameter.
        self.tp_layouts = {n: (lay.owner, lay.local_name, lay.spec) for n, lay in param_layouts(model).items() if lay.spec in SHARDED}
        named = dict(model.named_parameters())
        self.full_shapes = {n: tuple(p.shape) for n, p in named.items()}
        self.logical_shapes = {
            n: tuple(getattr(p, "logical_shape", None) or (self.tp_layouts[n][0].logical_shape(self.tp_layouts[n][1]) if n in self.tp_layouts else p.shape))
            for n, p in named.items()
        }
        self.specs: Dict[str, TensorShard] = {}
        self.shard_cgs: Dict[str, CommGroup] = {}
        self.units: List[Unit] = []
        self.replicated: List[Tuple[str, nn.Parameter]] = []
        self.hybrid: List[Tuple[str, nn.Parameter]] = []
        self.sparse_rows: List[SparseRows] = []
        self._hooks: list = []
        self._inflight: deque = deque()
        self._completed: List[Instance] = []
        self._live: "weakref.WeakSet[Instance]" = weakref.WeakSet()
        self._hybrid_acc: Dict[int, torch.Tensor] = {}
        self._tally: Dict[str, int] = defaultdict(int)
        self.last_step: Dict[str, int] = {}
        # Dense unit gathers consumed from a prefetch (overlapped with compute) or issued and waited for on the spot.
        self._gathers = {"prefetched": 0, "waited": 0}
        self.last_gathers: Dict[str, int] = {}
        self.peak_gathered_bytes = 0
        self.node_cg, self.cross_cg = self._hybrid_groups(dims, group)
        self.enabled = dp > 1
        for name, p in named.items():
            if id(p) not in ignored:
                self._mark(p, "replicated", dp)
        if not self.enabled:
            return
        self._build_units(model, named, ignored)

    # ------------------------------------------------------------------ construction
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

    @staticmethod
    def _mark(p: nn.Parameter, split: str, replicas: int) -> None:
        # For gradient clipping: how many dp_cp ranks hold the same values of this tensor.
        p.fssdp_split, p.fssdp_replicas = split, replicas

    def _build_units(self, model: nn.Module, named: Dict[str, nn.Parameter], ignored) -> None:
        layers = getattr(model, "layers", None)
        blocks = list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers or [])
        block_ids = {id(b): i for i, b in enumerate(blocks)}
        # Every place a parameter is registered, and the unit of the module holding it.
        sites: Dict[int, List[Tuple[nn.Module, str]]] = defaultdict(list)
        unit_of: Dict[int, set] = defaultdict(set)
        owner_kind: Dict[int, bool] = {}
        stack: List[Tuple[nn.Module, int]] = [(model, len(blocks))]  # len(blocks) = the rest-unit
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
                owner_kind[id(p)] = isinstance(module, RMSNorm)
            for child in module.children():
                stack.append((child, block_ids.get(id(child), u)))
        units = [Unit(f"layers.{i}", False) for i in range(len(blocks))] + [Unit("rest", True)]
        groups: Dict[int, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for name, p in named.items():
            if len(unit_of[id(p)]) > 1:
                raise ValueError(f"FSSDP: parameter {name} is shared by two units; sharing across blocks is not supported")
            if not p.requires_grad or id(p) in ignored:
                continue
            u = next(iter(unit_of[id(p)]))
            shape = tuple(p.shape)
            hybrid = p.numel() < self.replicate_below or (self.replicate_norms and owner_kind[id(p)])
            cg = (self.cross_cg if self.cross_cg is not None else self.cg) if hybrid and self.n_nodes > 1 else self.cg
            degree = self.n_nodes if hybrid else self.cg.size
            bounds = dim0_bounds(shape, degree)
            if bounds is None:
                self.replicated.append((name, p))
                continue
            kind = "hybrid" if cg is self.cross_cg else "shard"
            spec = TensorShard(name, kind, shape, self.logical_shapes[name], p.dtype, bounds, cg.rank)
            shard = nn.Parameter(spec.cut(p.detach()).clone())
            shard.tp_split = getattr(p, "tp_split", "replicated")
            shard.logical_shape = self.logical_shapes[name]
            self._mark(shard, "rows", self.node_size if kind == "hybrid" else 1)
            for module, pname in sites[id(p)]:
                module._parameters[pname] = shard
            self.specs[name], self.shard_cgs[name] = spec, cg
            if kind == "hybrid":
                self.hybrid.append((name, shard))
            where = list(sites[id(p)])
            if self.sparse_embedding and u == len(blocks) and kind == "shard" and len(where) == 1 and eligible(where[0][0]):
                rows = SparseRows(self, where[0][0], spec, shard, cg)
                where[0][0].__dict__["forward"] = rows.forward  # found before the class's forward
                self.sparse_rows.append(rows)
                continue
            groups[u][kind].append((spec, shard, where))
        for u, unit in enumerate(units):
            for kind in ("shard", "hybrid"):
                entries = groups[u].get(kind)
                if not entries:
                    continue
                cg = self.cg if kind == "shard" else self.cross_cg
                unit.flats.append(FlatGroup([e[0] for e in entries], cg, self.gather_dtype, self.reduce_dtype))
                for _, shard, where in entries:
                    unit.params.append(shard)
                    unit.sites.append(where)
        self.units = [u for u in units if u.params]
        self._install_hooks(units, blocks)

    def _install_hooks(self, units: List[Unit], blocks) -> None:
        live = [u for u in units[:-1] if u.params]
        for a, b in zip(live, live[1:]):
            a.next = b
        rest = units[-1]
        for i, block in enumerate(blocks):
            if units[i].params:
                self._hooks.append(block.register_forward_pre_hook(partial(self._pre_forward, units[i])))
                self._hooks.append(block.register_forward_hook(partial(self._post_forward, units[i], True)))
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
        for m in mods:
            self._hooks.append(m.register_forward_pre_hook(partial(self._pre_forward, rest)))
            self._hooks.append(m.register_forward_hook(partial(self._post_forward, rest, m is mods[-1])))

    # ------------------------------------------------------------------ forward
    def _count(self, kind: str, nbytes: int, cg: CommGroup) -> None:
        if cg.size > 1:
            self._tally[f"{cg.name}/{kind}"] += nbytes

    def _launch(self, unit: Unit, async_op: bool) -> Pending:
        for flat in unit.flats:
            self._count("all_gather", flat.gather_bytes, flat.cg)
        return unit.launch(async_op)

    def _take(self, pending: Optional[Pending], unit: Unit) -> Pending:
        """The prefetched gather if it read the parameters as they are now (a stale one is waited for and
        dropped), else a gather launched and waited for now. Counted in `last_gathers`."""
        if pending is not None and pending.versions == unit.versions():
            self._gathers["prefetched"] += 1
            return pending
        if pending is not None:
            unit.complete(pending)
        self._gathers["waited"] += 1
        return self._launch(unit, async_op=False)

    def _pre_forward(self, unit: Unit, module, args) -> None:
        cur = unit.current
        if cur is not None and cur.open:
            if unit.is_rest and cur.versions == unit.versions() and cur.grad == torch.is_grad_enabled():
                return  # the rest-unit's later modules (norm, head) reuse the gather of its first
            self._close(cur)
        pending = self._take(unit.prefetched, unit)
        unit.prefetched = None
        fulls = unit.complete(pending)
        inst = Instance(unit, pending.versions)
        inst.grad = torch.is_grad_enabled()
        outs = GatherUnit.apply(self, inst, fulls, *unit.params) if inst.grad else tuple(fulls)
        del fulls
        inst.storages = [t.untyped_storage() for t in outs]
        inst.shapes, inst.dtypes = [t.shape for t in outs], [t.dtype for t in outs]
        for t, where in zip(outs, unit.sites):
            for m, attr in where:
                m.__dict__[attr] = t
        inst.open = True
        unit.current = inst
        self._live.add(inst)
        self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.live_gathered_bytes())
        nxt = unit.next
        if nxt is not None and nxt.prefetched is None:
            nxt.prefetched = self._launch(nxt, async_op=True)

    def _embedding_done(self) -> None:
        """The embedding's rows arrived: start gathering the first block."""
        first = next((u for u in self.units if not u.is_rest), None)
        if first is not None and first.prefetched is None:
            first.prefetched = self._launch(first, async_op=True)

    def _post_forward(self, unit: Unit, last: bool, module, args, output) -> None:
        inst = unit.current
        if inst is None or not inst.open:
            return
        if inst.grad:
            for t in tree_flatten(output)[0]:
                if torch.is_tensor(t) and t.requires_grad:
                    t.register_hook(partial(self._pre_backward, inst))
        if last:
            self._close(inst)

    def _close(self, inst: Instance) -> None:
        unit = inst.unit
        for where in unit.sites:
            for m, attr in where:
                m.__dict__.pop(attr, None)
        inst.open = False
        if unit.current is inst:
            unit.current = None
        if not inst.grad:
            inst.storages = []  # no backward: the tensors die with their last use
            return
        self._completed.append(inst)
        if self.reshard_after_forward and not unit.is_rest:
            for s in inst.storages:
                s.resize_(0)
            inst.freed = True

    # ------------------------------------------------------------------ backward
    def _pre_backward(self, inst: Instance, grad) -> None:
        if inst.done:
            return
        if inst.freed:
            pending = self._take(inst.prefetch, inst.unit)
            inst.prefetch = None
            for s, shape, dtype, new in zip(inst.storages, inst.shapes, inst.dtypes, inst.unit.complete(pending)):
                s.resize_(new.numel() * new.element_size())
                # A fresh alias of the storage has its own version counter: autograd's saved tensors stay valid.
                torch.empty(0, dtype=dtype, device=new.device).set_(s, 0, shape).copy_(new)
            inst.freed = False
            self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.live_gathered_bytes())
        k = next((i for i, x in enumerate(self._completed) if x is inst), 0)
        prev = self._completed[k - 1] if k > 0 else None
        if prev is not None and prev.freed and prev.prefetch is None and not prev.done:
            prev.prefetch = self._launch(prev.unit, async_op=True)

    def _backward(self, inst: Instance, grads) -> None:
        unit = inst.unit
        inst.done = True
        for s in inst.storages:
            s.resize_(0)
        inst.storages = []
        self._completed = [x for x in self._completed if x is not inst]
        if unit.acc is not None:  # earlier micro-batches first, the order DP's local accumulation adds them in
            grads = [a if g is None else (g.clone() if a is None else a.add_(g)) for a, g in zip(unit.acc, grads)]
            unit.acc = None
        if self.defer_accumulation and not self._final:
            unit.acc = [None if g is None else g.clone() for g in grads]
            return
        self._reduce(unit, grads)

    def _reduce(self, unit: Unit, grads) -> None:
        launched, i = [], 0
        for flat in unit.flats:
            n = len(flat.shards)
            self._count("reduce_scatter", flat.reduce_bytes, flat.cg)
            launched.append((flat, unit.params[i : i + n], *flat.launch_reduce(grads[i : i + n], async_op=True)))
            i += n
        self._inflight.append(launched)
        while len(self._inflight) > self.max_inflight:
            self._land(self._inflight.popleft())

    def _land(self, launched) -> None:
        for flat, params, work, out, _send in launched:
            if work is not None:
                work.wait()
            for spec, p, g in zip(flat.shards, params, flat.shard_grads(out)):
                if spec.kind == "hybrid":
                    acc = self._hybrid_acc.get(id(p))
                    self._hybrid_acc[id(p)] = g.clone() if acc is None else acc.add_(g)
                elif p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)

    # ------------------------------------------------------------------ end of step
    def prepare(self, final: bool) -> None:
        """Before each micro-batch's backward, as GradReducer.prepare. With `defer_accumulation`, the backward
        of a non-final micro-batch adds the unsharded gradients up locally and the final one reduce-scatters
        the sum: DP's summation order (bit-identical sums at dp=2), at the cost of holding the full compact
        gradients through the accumulation. Without it (the default) this is a no-op: every micro-batch is
        reduce-scattered and only 1/dp of the gradients is ever kept."""
        self._final = bool(final)

    def finish(self) -> None:
        """After the step's last backward: wait for the reduce-scatters, drop stale prefetches, reduce the
        hybrid and replicated gradients. Gradients are then complete (each rank's shard summed over all ranks)."""
        if not self.enabled:
            return
        for unit in self.units:  # deferred gradients whose final micro-batch was not marked: reduce them now
            if unit.acc is not None:
                grads, unit.acc = unit.acc, None
                self._reduce(unit, grads)
        for rows in self.sparse_rows:
            rows.flush()
        self._final = True
        while self._inflight:
            self._land(self._inflight.popleft())
        for unit in self.units:
            if unit.prefetched is not None:  # launched for a forward that will see other weights after the step
                unit.complete(unit.prefetched)
                unit.prefetched = None
        if self.hybrid:  # hybrid tensors exist only with a node group of more than one rank
            self._all_reduce_into([(p, self._hybrid_acc.get(id(p))) for _, p in self.hybrid], self.node_cg, accumulate=True)
        self._hybrid_acc.clear()
        if self.replicated:
            self._all_reduce_into([(p, p.grad) for _, p in self.replicated], self.cg, accumulate=False)
        self.last_step, self.last_gathers = dict(self._tally), dict(self._gathers)
        self._tally.clear()
        self._gathers = {"prefetched": 0, "waited": 0}

    def _all_reduce_into(self, pairs, cg: CommGroup, accumulate: bool) -> None:
        """One flat all-reduce per dtype of `pairs` (param, tensor or None = zeros); the sums become the grads
        (`accumulate`: added to them)."""
        by_dtype: Dict[torch.dtype, list] = defaultdict(list)
        for p, t in pairs:
            by_dtype[p.dtype].append((p, t))
        for dtype, items in by_dtype.items():
            flat = torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p, t in items])
            self._count("all_reduce", flat.numel() * flat.element_size(), cg)
            all_reduce_(flat, cg.group, cg.name, cg.stats)
            off = 0
            for p, _ in items:
                g = flat[off : off + p.numel()].view(p.shape).clone()
                off += p.numel()
                p.grad = p.grad.add_(g) if accumulate and p.grad is not None else g

    # ------------------------------------------------------------------ API
    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """(logical name, tensor the optimizer updates): the shards, and the replicated parameters."""
        return self.model.named_parameters()

    def live_gathered_bytes(self) -> int:
        """Bytes of gathered full tensors alive now, read from their storages (0 once freed)."""
        return sum(inst.nbytes for inst in list(self._live))

    @property
    def bytes_gathered_last_step(self) -> int:
        """Parameter bytes this rank's gathers moved in the last step (dense and sparse)."""
        return sum(v for k, v in self.last_step.items() if k.endswith(("/all_gather", "/sparse_all_gather")))

    @property
    def bytes_reduced_last_step(self) -> int:
        return sum(v for k, v in self.last_step.items() if k.endswith(("/reduce_scatter", "/sparse_reduce_scatter", "/all_reduce")))

    def gather_bytes_per_pass(self) -> int:
        """Bytes one gather of every unit records (payload, padding included)."""
        return sum(f.gather_bytes for u in self.units for f in u.flats if f.cg.size > 1)

    def padding_numel(self) -> int:
        return sum(s.padding_numel for s in self.specs.values())

    def describe(self) -> str:
        if not self.enabled:
            return f"fssdp: {self.cg.name} group of one, no-op"
        shard = sum(s.full_numel for s in self.specs.values() if s.kind == "shard")
        hyb = sum(s.full_numel for s in self.specs.values() if s.kind == "hybrid")
        rep = sum(p.numel() for _, p in self.replicated)
        return (
            f"fssdp: {len(self.units)} units over {self.cg.name} ({self.cg.size} ranks); {shard / 1e6:.2f}M elements sharded, "
            f"{hyb / 1e6:.3f}M sharded over {self.n_nodes} nodes of {self.node_size}, {rep / 1e6:.3f}M replicated; "
            f"gather {self.gather_dtype}, reduce {self.reduce_dtype}, "
            f"{'reshard' if self.reshard_after_forward else 'keep'} after forward"
        )

    def remove(self) -> None:
        """Detach FSSDP from the model (hooks, the sparse embedding's forward). The model keeps its shards and
        can no longer run; `logical_state_dict()` still works, for a single-process copy."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for rows in self.sparse_rows:
            rows.module.__dict__.pop("forward", None)
