"""`parallelize` in one process returns the typed `ParallelModel` (materialized, annotated, a no-op gradient sync,
the plain logical view); GradReducer, FSSDP and LogicalState conform to the interfaces the trainer and the
checkpoints use; the one accumulation loop orders the gradient sync the same for the plain and pipeline schedules.
The layouts themselves are proven against one process in tests/distributed/."""

from __future__ import annotations

import torch

from megaeff.config import compose
from megaeff.distributed import logical_state
from megaeff.distributed.data_parallel.bucketed import GradReducer
from megaeff.distributed.dims import ParallelDims
from megaeff.distributed.fssdp.engine import FSSDP
from megaeff.distributed.parallel_model import GradSync, LogicalState, ParallelModel
from megaeff.distributed.parallelize import parallelize
from megaeff.distributed.pipeline.schedule import build_schedule
from megaeff.layers.param_meta import param_meta
from megaeff.models.init import materialize
from megaeff.models.llama import build_llama
from megaeff.train.step import accumulate, plain_actions

ONE = ParallelDims(tp=1, cp=1, dp=1, pp=1, world_size=1)


def smoke():
    cfg = compose(["experiment=smoke"])
    return cfg, build_llama(cfg.model, cfg.method, device="meta")


def test_single_process_parallelize_materializes_annotates_and_wraps():
    cfg, model = smoke()
    pm = parallelize(model, ONE, cfg)
    assert isinstance(pm, ParallelModel) and pm.module is model
    assert pm.chunks == [] and pm.context is None and not pm.dp_sharded and not pm.experts_distributed
    assert isinstance(pm.grad_sync, GradReducer) and not pm.grad_sync.enabled
    assert isinstance(pm.state, logical_state.LogicalState) and not pm.state.sharded
    assert isinstance(pm.grad_sync, GradSync) and isinstance(pm.state, LogicalState)
    assert not any(p.is_meta for p in model.parameters())
    metas = [(param_meta(p), p) for p in model.parameters()]
    assert all(m.tp_split == "replicated" and m.logical_shape == tuple(p.shape) for m, p in metas)
    # One process: exactly the logical model drawn from the seed.
    _, ref = smoke()
    ref = materialize(ref, torch.device("cpu"), cfg.train.seed, cfg.model.init_std)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_fssdp_is_a_grad_sync_and_a_logical_state():
    cfg, model = smoke()
    model = materialize(model, torch.device("cpu"), cfg.train.seed, cfg.model.init_std)
    logical_state.annotate_parameters(model)
    fs = FSSDP(model, ONE)
    assert isinstance(fs, GradSync) and isinstance(fs, LogicalState)


class Recorder:
    """A gradient sync and an executor writing one event list."""

    def __init__(self):
        self.events = []

    def prepare(self, final: bool) -> None:
        self.events.append(f"prepare({final})")

    def finish(self) -> None:
        self.events.append("finish")

    def describe(self) -> str:
        return "recorder"

    def forward(self, action) -> None:
        self.events.append(f"F{action.microbatch}c{action.chunk}")

    def backward(self, action) -> None:
        self.events.append(f"B{action.microbatch}c{action.chunk}")

    def drain(self) -> None:
        self.events.append("drain")


def test_plain_schedule_prepares_each_backward_and_flags_the_last():
    rec = Recorder()
    accumulate(plain_actions(3), rec, rec)
    assert rec.events == [
        "F0c0",
        "prepare(False)",
        "B0c0",
        "F1c0",
        "prepare(False)",
        "B1c0",
        "F2c0",
        "prepare(True)",
        "B2c0",
        "drain",
        "finish",
    ]


def test_pipeline_schedules_share_the_loop():
    for name, pp, virtual in (("gpipe", 2, 1), ("1f1b", 4, 1), ("interleaved", 2, 2)):
        for actions in build_schedule(name, pp, 4, virtual):
            rec = Recorder()
            accumulate(actions, rec, rec)
            ev = rec.events
            backwards = [i for i, e in enumerate(ev) if e.startswith("B")]
            assert len(backwards) == 4 * virtual
            assert all(ev[i - 1].startswith("prepare(") for i in backwards)
            assert [ev[i - 1] for i in backwards] == ["prepare(False)"] * (len(backwards) - 1) + ["prepare(True)"]
            assert ev[-2:] == ["drain", "finish"]
            assert [e for e in ev if e[0] in "FB"] == [a.label(2) for a in actions]
