"""FSSDP's gradient side: reduce-scatter each unit's gradients as its backward ends, and complete them at the end
of the step. The interface is the trainer's gradient reducer's (megaeff/distributed/data_parallel/bucketed.py's
GradReducer): `prepare(final)`, `finish()`, `describe()`.

Backward. A unit's autograd Function (units.py, `GatherUnit`) hands the unit's gradients to `on_unit_backward`
once every one of them has arrived; it launches the reduce-scatter asynchronously (at most `max_inflight` in
flight, the oldest waited for first). Gradients are *summed*, never averaged: the trainer already divides the
loss by the global token count. By default each micro-batch is reduce-scattered on its own and added into the
shard's `.grad` (FSDP2's default): gradients only ever take 1/dp, but the sum over ranks and micro-batches is
added in another order than DP's (local sum first), which AdamW can amplify where a gradient element nearly
cancels. `defer_accumulation=True` sums the micro-batches locally, unsharded, and reduce-scatters once in the
final one (`prepare(final=...)`, FSDP2's no-sync; `accumulating` says which case a backward is in): DP's order,
full compact gradients held through the accumulation. The sparse embedding (embedding.py) follows the same rule
for its rows.

End of step (`finish()`). Wait for the reduce-scatters; the hybrid tensors' (plan.py) reduce-scattered
gradients are all-reduced within the node (`node_cg`): the sum over every rank, at 1/n_nodes of the all-reduce
volume; the replicated tensors' gradients are all-reduced over the whole group. Then the byte tally closes the
step (tally.py).

Optimizer in backward (`set_final_hook`, megaeff/train/in_backward.py): as the reduce-scatter of a unit's last
micro-batch lands, the unit's shard parameters are reported (their `.grad` is then complete: every micro-batch
landed before it, in launch order), so each is updated and its gradient freed during backward; hybrid and
replicated tensors are reported in `finish()` after their all-reduce. The unsharded unit gradients are dropped
as each reduce-scatter lands, so no full-size gradient outlives its unit's reduction.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Dict, List

import torch

from megaeff.distributed.comm import CommGroup, all_reduce_
from megaeff.distributed.fssdp.tally import ByteTally
from megaeff.distributed.fssdp.units import Instance, Unit


class FSSDPGradSync:
    """The gradient reducer of a ShardingPlan's units, sparse embedding rows, hybrid and replicated tensors (see
    the module docstring). Sparse embeddings join with `track_sparse_rows`."""

    def __init__(self, plan, tally: ByteTally):
        self.plan, self.tally = plan, tally
        self.defer_accumulation = plan.options.defer_accumulation
        self.max_inflight = plan.options.max_inflight
        self.final = True
        self.sparse_rows: list = []
        self._inflight: deque = deque()
        self._hybrid_acc: Dict[int, torch.Tensor] = {}
        self._final_hook = None

    def set_final_hook(self, hook) -> None:
        """`GradSync.set_final_hook` (module docstring)."""
        self._final_hook = hook

    def track_sparse_rows(self, rows) -> None:
        """Flush `rows` (embedding.py's SparseRows) at every `finish()`."""
        self.sparse_rows.append(rows)

    @property
    def accumulating(self) -> bool:
        """Whether a backward now only accumulates its gradients locally (deferred, not the final micro-batch)."""
        return self.defer_accumulation and not self.final

    # ------------------------------------------------------------------ backward
    def on_unit_backward(self, inst: Instance, grads) -> None:
        """The gradients of every tensor of `inst`'s unit (None: no gradient), in the unit's order."""
        unit = inst.unit
        if unit.acc is not None:  # earlier micro-batches first, the order DP's local accumulation adds them in
            grads = [a if g is None else (g.clone() if a is None else a.add_(g)) for a, g in zip(unit.acc, grads)]
            unit.acc = None
        if self.accumulating:
            unit.acc = [None if g is None else g.clone() for g in grads]
            return
        self._reduce(unit, grads)

    def _reduce(self, unit: Unit, grads) -> None:
        launched, i = [], 0
        for flat in unit.flats:
            n = len(flat.shards)
            self.tally.count("reduce_scatter", flat.reduce_bytes, flat.cg)
            launched.append((flat, unit.params[i : i + n], *flat.launch_reduce(grads[i : i + n], async_op=True)))
            i += n
        self._inflight.append((self.final, launched))
        while len(self._inflight) > self.max_inflight:
            self._land(*self._inflight.popleft())

    def _land(self, final: bool, launched) -> None:
        done = []
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
                if spec.kind != "hybrid":
                    done.append(p)
        if final and self._final_hook is not None:
            self._final_hook(done)

    # ------------------------------------------------------------------ end of step
    def prepare(self, final: bool) -> None:
        """Before each micro-batch's backward, as GradReducer.prepare. With `defer_accumulation`, the backward
        of a non-final micro-batch adds the unsharded gradients up locally and the final one reduce-scatters
        the sum: DP's summation order (bit-identical sums at dp=2), at the cost of holding the full compact
        gradients through the accumulation. Without it (the default) this is a no-op: every micro-batch is
        reduce-scattered and only 1/dp of the gradients is ever kept."""
        self.final = bool(final)

    def finish(self) -> None:
        """After the step's last backward: wait for the reduce-scatters, retire stale prefetched gathers, reduce
        the hybrid and replicated gradients. Gradients are then complete (each rank's shard summed over all ranks)."""
        plan = self.plan
        if not plan.enabled:
            return
        self.final = True  # what is reduced from here on is final
        for unit in plan.units:  # deferred gradients whose final micro-batch was not marked: reduce them now
            if unit.acc is not None:
                grads, unit.acc = unit.acc, None
                self._reduce(unit, grads)
        for rows in self.sparse_rows:
            rows.flush()
        while self._inflight:
            self._land(*self._inflight.popleft())
        for unit in plan.units:  # a gather launched for a forward that will see other weights after the step
            unit.retire_prefetch()
        if plan.hybrid:  # hybrid tensors exist only with a node group of more than one rank
            pairs = [(p, self._hybrid_acc.get(id(p))) for _, p in plan.hybrid]
            self._all_reduce_into(pairs, plan.node_cg, accumulate=True)
            if self._final_hook is not None:
                self._final_hook([p for p, _ in pairs])
        self._hybrid_acc.clear()
        if plan.replicated:
            self._all_reduce_into([(p, p.grad) for _, p in plan.replicated], plan.cg, accumulate=False)
            if self._final_hook is not None:
                self._final_hook([p for _, p in plan.replicated])
        self.tally.close_step()

    def _all_reduce_into(self, pairs, cg: CommGroup, accumulate: bool) -> None:
        """One flat all-reduce per dtype of `pairs` (param, tensor or None = zeros); the sums become the grads
        (`accumulate`: added to them)."""
        by_dtype: Dict[torch.dtype, List] = defaultdict(list)
        for p, t in pairs:
            by_dtype[p.dtype].append((p, t))
        for dtype, items in by_dtype.items():
            flat = torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p, t in items])
            self.tally.count("all_reduce", flat.numel() * flat.element_size(), cg)
            all_reduce_(flat, cg.group, cg.name, cg.stats)
            off = 0
            for p, _ in items:
                g = flat[off : off + p.numel()].view(p.shape).clone()
                off += p.numel()
                p.grad = p.grad.add_(g) if accumulate and p.grad is not None else g

    def describe(self) -> str:
        plan, opts = self.plan, self.plan.options
        if not plan.enabled:
            return f"fssdp: {plan.cg.name} group of one, no-op"
        shard = sum(s.full_numel for s in plan.specs.values() if s.kind == "shard")
        hyb = sum(s.full_numel for s in plan.specs.values() if s.kind == "hybrid")
        rep = sum(p.numel() for _, p in plan.replicated)
        return (
            f"fssdp: {len(plan.units)} units over {plan.cg.name} ({plan.cg.size} ranks); "
            f"{shard / 1e6:.2f}M elements sharded, "
            f"{hyb / 1e6:.3f}M sharded over {plan.n_nodes} nodes of {plan.node_size}, {rep / 1e6:.3f}M replicated; "
            f"gather {opts.gather_dtype}, reduce {opts.reduce_dtype}, "
            f"{'reshard' if opts.reshard_after_forward else 'keep'} after forward"
        )
