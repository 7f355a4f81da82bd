"""The real counterpart of `measure_step` (megaeff/train/memory/fake_step.py): one training step of this rank on
real CPU tensors, inside a real multi-rank process group (gloo), under the same tracker.

    # in every rank of an initialized gloo world of layout_world_size(cfg) processes:
    dims = make_dims(cfg, dist.get_rank())
    report = measure_real_step(cfg, dims)      # .peak_bytes, .extra["comm_bytes"]

It runs the code `measure_step` runs, in the same order: `build_rank`, the tracker around `make_batches` and
`StepRunner.run`, the byte counters of megaeff/distributed/comm.py reset just before the step. Only the world
differs: the collectives really move data between processes, and values are real (the loss, the gradient norm,
token counts), so a difference between the two reports is a difference the fake world makes. The batches are
`make_batches(cfg, seed=seed)` on every rank, the same token ids the fake measurement of each rank assumes
(it takes every rank to mirror itself); another seed per rank measures what that assumption costs
(tools/bench/planner_validate.py --distinct-tokens).
"""

from __future__ import annotations

import gc
import weakref
from typing import Dict

import torch
from torch.utils._pytree import tree_leaves

from megaeff.config.schema import Config
from megaeff.distributed.dims import AXES, ParallelDims
from megaeff.layers.grad_accum_fusion import grad_of
from megaeff.train.memory.fake_step import build_rank, make_batches, storage_bytes
from megaeff.train.memory.tracker import MemoryReport, StepMemoryTracker


def _storages_alive() -> Dict[int, weakref.ref]:
    """Every strided tensor storage Python can reach now, by key (a weak reference: a key reused by a later
    storage is not mistaken for it)."""
    out = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.layout == torch.strided and not obj.is_meta:
            st = obj.untyped_storage()
            out[st._cdata] = weakref.ref(st)
    return out


class RealStepTracker(StepMemoryTracker):
    """StepMemoryTracker that also follows, apart, the storages born out of its sight during the step: first
    seen as the output of a view op (so allocated where no dispatch mode of this thread ran) although they did
    not exist when the step began. On gloo these are the backend's own buffers: its reduce-scatter reduces a
    copy of the whole input in gloo's worker thread and slices this rank's part out of it in `Work.wait()`, where
    the tracker first sees it (FSSDP's gradient reduce-scatter, sequence parallelism's activation one). NCCL has
    no such tensor and the fake process group none either, so `peak_without_unseen` (the peak of everything
    else, sampled after every op) is what the fake step's peak is compared with besides the raw `peak_bytes`."""

    def __init__(self, model, optimizer=None, fake_reads: bool = False):
        super().__init__(model, optimizer, fake_reads)
        self.before: Dict[int, weakref.ref] = {}
        self.seen: Dict[int, weakref.ref] = {}
        self.unseen_live = 0
        self.unseen_peak = 0  # most bytes of such storages alive at once
        self.peak_without_unseen = 0
        self.unseen_ops: Dict[str, int] = {}  # the op each was first seen at -> their bytes

    def __enter__(self):
        self.before = _storages_alive()
        return super().__enter__()

    def _unseen_died(self, nbytes: int) -> None:
        self.unseen_live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        # torch.tensor(...) allocates unseen and shows its result first at lift_fresh, in this thread, on both
        # sides alike: not another thread's buffer.
        view = func is not torch.ops.aten.lift_fresh.default and any(
            r.alias_info is not None for r in func._schema.returns
        )
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            st = t.untyped_storage()
            key, ref = st._cdata, self.seen.get(st._cdata)
            if ref is not None and ref() is not None:
                continue
            self.seen[key] = weakref.ref(st)
            old = self.before.get(key)
            if view and (old is None or old() is None):
                n = st.nbytes()
                self.unseen_live += n
                self.unseen_ops[str(func)] = self.unseen_ops.get(str(func), 0) + n
                self.seen[key] = weakref.ref(st, lambda _, n=n: self._unseen_died(n))
        self.unseen_peak = max(self.unseen_peak, self.unseen_live)
        self.peak_without_unseen = max(self.peak_without_unseen, self.live_bytes - self.unseen_live)
        return out


def measure_real_step(
    cfg: Config, dims: ParallelDims, *, step: int = 0, seed: int = 0, tracker_cls=RealStepTracker
) -> MemoryReport:
    """Peak live bytes and payload bytes per "<axis>/<kind>" of one real step of `dims.rank` (module docstring).
    Every rank of `dims` must call it with the same `cfg` (the step's collectives are real)."""
    rs = build_rank(cfg, dims)
    tracker = tracker_cls(rs.parallel.module, rs.optimizer)
    dims.comm_stats.reset()  # what the build or an earlier call sent is not this step's
    with tracker:
        batches = make_batches(cfg, seed=seed)
        metrics = rs.runner.run(batches, step)
        del batches
    report = tracker.report()
    state = [t for st in rs.optimizer.state.values() for t in tree_leaves(st) if isinstance(t, torch.Tensor)]
    report.extra.update(
        comm_bytes=dims.comm_stats.snapshot(),
        param_bytes=storage_bytes(rs.parallel.module.parameters()),
        grad_bytes=storage_bytes(g for g in map(grad_of, rs.parallel.module.parameters()) if g is not None),
        optimizer_state_bytes=storage_bytes(state),
        act_saved_bytes=int(metrics["act_saved_bytes"]),
        layout={axis: dims.size(axis) for axis in AXES},
        rank=dims.rank,
        fake=False,
        optimizer_stepped=tracker.optimizer_steps > 0,
        loss=metrics["loss"],
    )
    if isinstance(tracker, RealStepTracker):
        report.extra.update(
            unseen_peak_bytes=tracker.unseen_peak,
            peak_without_unseen=tracker.peak_without_unseen,
            unseen_ops=dict(tracker.unseen_ops),
        )
    return report
