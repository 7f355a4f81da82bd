"""FSSDP's forward machinery: gather a unit before it computes, prefetch the next, reshard after forward, refill
before backward. And `FSSDP`, the facade that builds the plan, engine, gradient sync and logical state.

Forward. A forward pre-hook gathers the unit (or takes the gather prefetched while the previous unit computed)
and exposes the full tensors to the unit's modules as plain instance attributes (`module.__dict__[name]`, which
Python finds before nn.Module's `_parameters`), produced by one autograd Function (units.py, `GatherUnit`) whose
backward hands the gradients to the gradient sync (grad_sync.py). The next unit's gather is launched
asynchronously at once. With `reshard_after_forward=True` the post-hook frees the gathered storage: autograd
still holds the tensor objects it saved, their memory is gone, and the hook on the unit's output gradient
refills the same storage (gathered again, prefetching the unit before it) just before the unit's backward runs.
The rest-unit is not resharded when its forward ends: its head runs last in forward and first in backward, so it
would be gathered again at once (torch FSDP2 does the same for its root). It is resharded when the next forward
of the rest-unit starts before its backward ran (a pipeline: GPipe, 1F1B's and interleaved warm-ups run other
micro-batches' forwards first): at most one gathered copy of the rest-unit is kept, not one per in-flight
micro-batch. A gathered tensor lives from its unit's forward (or re-gather) to the end of its backward, when
`release` frees it.

One step (the trainer's order; GradReducer is not used with FSSDP):

    optimizer.zero_grad(set_to_none=True)
    for i, mb in enumerate(micro_batches):
        fs.prepare(final=i == len(micro_batches) - 1)   # matters only with defer_accumulation
        (loss(mb) / global_tokens).backward()   # reduce-scatters run during each backward
    fs.finish()                                 # wait for them, reduce replicated / hybrid gradients
    norm = clip_grad_norm_(list(fs.parameters()), max_norm, dims, dp_sharded=True)   # megaeff/distributed/grad_norm.py
    optimizer.step()

Memory. Parameters, gradients and moments take 1/d of the all-reduce layout's; FSSDP adds a constant number of
unit-sized buffers, whatever the depth or the micro-batches in flight (U: one unit's fp32 bytes): `max_inflight`
reduce-scatters (each its fp32 send buffer, the whole unit gradient, and its U/d output), the refill of the unit
whose backward starts (its gather, the unpacked fp32 tensors and the refilled storage: about 2.75U with bf16
gathers) and the gather prefetched for the next unit's next forward, which an interleaved pipeline holds across the
backwards it runs in between. About 6.5U at d = 2, so a rank holding few units (a deep pipeline's stage of a small
model) peaks above the all-reduce layout; per unit it holds, FSSDP saves (1 - 1/d) of its parameters, gradients
and moments (docs/memory.md, "FSSDP under a pipeline"; tests/distributed/test_fssdp_pipeline_memory.py). Nothing
else is kept per in-flight micro-batch: autocast's bf16 copies of the gathered weights are saved per in-flight
chunk exactly as the all-reduce layout's copies of its parameters are.

Every collective goes through megaeff/distributed/comm.py and is counted in `dims.comm_stats` (dp_cp/all_gather,
dp_cp/reduce_scatter, dp_cp/all_reduce; the embedding's dp_cp/sparse_all_gather, dp_cp/sparse_reduce_scatter and
dp_cp/all_to_all of token ids; the hybrid groups' dp_cp_cross/* and dp_cp_node/all_reduce); `last_step` holds
this object's own totals between two `finish()` calls, `last_gathers` how many unit gathers were prefetched
(overlapped with compute) or waited for (tally.py). Gathered tensors are not model parameters, so
megaeff/precision/saved_bytes.py counts the ones autograd saves as activations (their storage is freed after
forward when resharding). A dp_cp group of one is a no-op. Not supported: activation checkpointing that re-runs
a unit's forward inside backward, a second backward through one graph (retain_graph), a parameter shared by
two units.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from megaeff.distributed.fssdp.embedding import SparseRows
from megaeff.distributed.fssdp.grad_sync import FSSDPGradSync
from megaeff.distributed.fssdp.plan import FSSDPOptions, ShardingPlan
from megaeff.distributed.fssdp.state import FSSDPState
from megaeff.distributed.fssdp.tally import ByteTally
from megaeff.distributed.fssdp.units import GatherUnit, Instance, Pending, Unit

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims


class FSSDPEngine:
    """The hooks that run a ShardingPlan's units (see the module docstring). Gathers are counted in `tally`;
    each unit's backward releases its instance here and hands the gradients to `grad_sync`. Builds the sparse
    embedding lookups (embedding.py) of the plan's embedding sites and hands them to `grad_sync` too."""

    def __init__(self, plan: ShardingPlan, tally: ByteTally, grad_sync: FSSDPGradSync):
        self.plan, self.tally, self.grad_sync = plan, tally, grad_sync
        self.reshard_after_forward = plan.options.reshard_after_forward
        self.peak_gathered_bytes = 0
        self.sparse_rows: List[SparseRows] = []
        self._hooks: list = []
        self._completed: List[Instance] = []
        self._live: "weakref.WeakSet[Instance]" = weakref.WeakSet()
        opts = plan.options
        for site in plan.embedding_sites:
            rows = SparseRows(
                site.module,
                site.spec,
                site.param,
                site.cg,
                tally=tally,
                sync=grad_sync,
                after_lookup=self.prefetch_first_block,
                gather_dtype=opts.gather_dtype,
                reduce_dtype=opts.reduce_dtype,
            )
            site.module.__dict__["forward"] = rows.forward  # found before the class's forward
            grad_sync.track_sparse_rows(rows)
            self.sparse_rows.append(rows)
        if plan.enabled:
            self._install_hooks()

    def _install_hooks(self) -> None:
        plan = self.plan
        for block, unit in zip(plan.blocks, plan.block_units):
            if unit.params:
                self._hooks.append(block.register_forward_pre_hook(partial(self._pre_forward, unit)))
                self._hooks.append(block.register_forward_hook(partial(self._post_forward, unit, True)))
        mods = plan.rest_modules
        for m in mods:
            self._hooks.append(m.register_forward_pre_hook(partial(self._pre_forward, plan.rest)))
            self._hooks.append(m.register_forward_hook(partial(self._post_forward, plan.rest, m is mods[-1])))

    # ------------------------------------------------------------------ gathers
    def _launch(self, unit: Unit, async_op: bool) -> Pending:
        for flat in unit.flats:
            self.tally.count("all_gather", flat.gather_bytes, flat.cg)
        return unit.launch(async_op)

    def _take(self, pending: Optional[Pending], unit: Unit) -> Pending:
        """The prefetched gather if it read the parameters as they are now (a stale one is waited for and
        dropped), else a gather launched and waited for now. Counted in `last_gathers`."""
        if pending is not None and pending.versions == unit.versions():
            self.tally.gathered("prefetched")
            return pending
        if pending is not None:
            unit.complete(pending)
        self.tally.gathered("waited")
        return self._launch(unit, async_op=False)

    def prefetch_first_block(self) -> None:
        """Start gathering the first block (the sparse embedding calls this once its rows arrived)."""
        first = self.plan.first_block()
        if first is not None and first.prefetched is None:
            first.prefetched = self._launch(first, async_op=True)

    # ------------------------------------------------------------------ forward
    def _pre_forward(self, unit: Unit, module, args) -> None:
        cur = unit.current
        if cur is not None and cur.open:
            if unit.is_rest and cur.versions == unit.versions() and cur.grad == torch.is_grad_enabled():
                return  # the rest-unit's later modules (norm, head) reuse the gather of its first
            self._close(cur)
        if unit.is_rest and self.reshard_after_forward:
            self._reshard_kept_rest(unit)
        pending = self._take(unit.prefetched, unit)
        unit.prefetched = None
        fulls = unit.complete(pending)
        inst = Instance(unit, pending.versions)
        inst.grad = torch.is_grad_enabled()
        outs = GatherUnit.apply(self, self.grad_sync, inst, fulls, *unit.params) if inst.grad else tuple(fulls)
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
            self._free(inst)

    def _free(self, inst: Instance) -> None:
        for s in inst.storages:
            s.resize_(0)
        inst.freed = True

    def _reshard_kept_rest(self, unit: Unit) -> None:
        """A new forward of the rest-unit begins while an earlier one still waits for its backward (a pipeline
        runs other forwards between a chunk's forward and its backward; GPipe runs them all first): free the
        earlier one's gathered storage, to be refilled before its backward like any unit's. Without this every
        in-flight micro-batch of the rest-unit's chunk kept a whole gathered copy (the tensor-parallel
        embedding on the first stage, the head on the last), more than the all-reduce layout's single copy."""
        for older in self._completed:
            if older.unit is unit and not older.freed:
                self._free(older)

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

    def release(self, inst: Instance) -> None:
        """`inst`'s backward ran: free its gathered storage for good."""
        inst.done = True
        for s in inst.storages:
            s.resize_(0)
        inst.storages = []
        self._completed = [x for x in self._completed if x is not inst]

    # ------------------------------------------------------------------ API
    def live_gathered_bytes(self) -> int:
        """Bytes of gathered full tensors alive now, read from their storages (0 once freed)."""
        return sum(inst.nbytes for inst in list(self._live))

    def remove(self) -> None:
        """Detach from the model: the hooks and the sparse embedding's forward."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for rows in self.sparse_rows:
            rows.module.__dict__.pop("forward", None)


class _Via:
    """An attribute of the facade read from one of its parts (`part`), under the same name unless `attr`."""

    def __init__(self, part: str, attr: Optional[str] = None):
        self.part, self.attr = part, attr

    def __set_name__(self, owner, name: str) -> None:
        self.attr = self.attr or name

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(getattr(obj, self.part), self.attr)


class FSSDP:
    """Shard `model` over `dims`' `group` (dp_cp): the sharding plan (`plan`, plan.py), the hooks (`engine`), the
    gradient reducer (`grad_sync`, grad_sync.py: `prepare` / `finish` / `describe`) and the logical view
    (`state`, state.py: the interface of megaeff.distributed.logical_state.LogicalState), sharing one byte
    tally (`tally`). This object offers all of their interfaces, so it serves as the trainer's gradient reducer
    and as the checkpoints' `logical=`. See the module docstrings for the step.

    Call it on the materialized (possibly tensor-parallel) model after `annotate_parameters` (the shards copy
    the tp split and logical shape of the parameters' records; annotating again afterwards would give them their
    own shapes) and before the optimizer is built, from `model` or `parameters()` (the same tensors).
    `ignored_params` are left to their owner (e.g. expert FSSDP's `expert_shards`): not sharded, not reduced, not
    marked; the owner sets their record's `dp_replicas` (how many dp_cp ranks hold the same values; 1 by default)
    for `clip_grad_norm_`. Options: see
    plan.FSSDPOptions; `replicate_norms` puts the RMSNorm gains under the heterogeneous rule (with the default
    single node: replicated), `max_inflight` bounds the reduce-scatters in flight. `local_world_size` (for
    `node_size=0`): the processes per node; None reads it from the launcher (megaeff/distributed/launch.py)."""

    def __init__(
        self,
        model: nn.Module,
        dims: ParallelDims,
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
        local_world_size: Optional[int] = None,
    ):
        options = FSSDPOptions(
            reshard_after_forward=bool(reshard_after_forward),
            gather_dtype=gather_dtype,
            reduce_dtype=reduce_dtype,
            replicate_below=int(replicate_below),
            node_size=node_size,
            replicate_norms=bool(replicate_norms),
            sparse_embedding=bool(sparse_embedding),
            defer_accumulation=bool(defer_accumulation),
            max_inflight=int(max_inflight),
            group=group,
        )
        self.plan = ShardingPlan(model, dims, options, ignored_params, local_world_size)
        self.tally = ByteTally()
        self.grad_sync = FSSDPGradSync(self.plan, self.tally)
        self.engine = FSSDPEngine(self.plan, self.tally, self.grad_sync)
        self.state = FSSDPState(self.plan)

    # the plan
    model, dims, cg, options, enabled = _Via("plan"), _Via("plan"), _Via("plan"), _Via("plan"), _Via("plan")
    units, specs, shard_cgs, replicated, hybrid = _Via("plan"), _Via("plan"), _Via("plan"), _Via("plan"), _Via("plan")
    node_size, n_nodes, node_cg, cross_cg = _Via("plan"), _Via("plan"), _Via("plan"), _Via("plan")
    tp_layouts, full_shapes, logical_shapes = _Via("plan"), _Via("plan"), _Via("plan")
    gather_bytes_per_pass, padding_numel = _Via("plan"), _Via("plan")
    reshard_after_forward, gather_dtype, reduce_dtype = _Via("options"), _Via("options"), _Via("options")
    replicate_below, replicate_norms, sparse_embedding = _Via("options"), _Via("options"), _Via("options")
    defer_accumulation, max_inflight = _Via("options"), _Via("options")
    # the engine
    sparse_rows, peak_gathered_bytes, live_gathered_bytes = _Via("engine"), _Via("engine"), _Via("engine")
    # the gradient sync (the trainer's gradient reducer)
    prepare, finish, describe = _Via("grad_sync"), _Via("grad_sync"), _Via("grad_sync")
    set_final_hook = _Via("grad_sync")  # optimizer in backward (megaeff/train/in_backward.py)
    # the byte tally
    last_step, last_gathers = _Via("tally"), _Via("tally")
    bytes_gathered_last_step, bytes_reduced_last_step = _Via("tally"), _Via("tally")
    # the logical state (checkpoints)
    sharded, gather, shard = _Via("state"), _Via("state"), _Via("state")
    gather_like, shard_like = _Via("state"), _Via("state")
    gather_model, shard_model = _Via("state"), _Via("state")
    gather_optimizer, shard_optimizer = _Via("state"), _Via("state")
    logical_state_dict, load_logical_state_dict = _Via("state"), _Via("state")
    logical_optimizer_state, load_logical_optimizer_state = _Via("state"), _Via("state")
    local_pieces, local_logical_names, logical_buffers = _Via("state"), _Via("state"), _Via("state")

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """(logical name, tensor the optimizer updates): the shards, and the replicated parameters."""
        return self.model.named_parameters()

    def remove(self) -> None:
        """Detach FSSDP from the model (hooks, the sparse embedding's forward). The model keeps its shards and
        can no longer run; `logical_state_dict()` still works, for a single-process copy."""
        self.engine.remove()
