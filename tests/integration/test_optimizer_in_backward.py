"""Optimizer in backward (`optim.in_backward=true`, megaeff/train/in_backward.py): the same run as the ordinary
optimizer step, bit for bit in float32 where the math is the same (no clipping, or a clip that never triggers;
the same inner AdamW implementation: `optim.impl=foreach` on both sides), with gradient accumulation, COAT FP8
states, FSSDP and a pipeline; gradients freed after the step; checkpoints resume across the two modes; a
non-finite gradient is never applied; the combinations it cannot run are refused; a variant that updates on
every micro-batch is caught by the same comparison."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megaeff.config.optim import validate_in_backward
from megaeff.distributed.dims import ParallelDims
from megaeff.errors import ConfigError, NonFiniteError
from megaeff.layers.param_meta import param_meta
from megaeff.train.trainer import Trainer
from tests.distributed.harness import pool_fixture
from tests.helpers import compose, records, train

BASE = [
    "train.ckpt_interval=0",
    "train.grad_accum=2",
    "train.micro_batch_size=2",
    "method.rank=8",
    "optim.impl=foreach",
]


def make_trainer(smoke_cfg, run_dir, *overrides) -> Trainer:
    cfg = smoke_cfg(run_dir, *BASE, *overrides)
    return Trainer(cfg, ParallelDims.from_config(cfg.parallel, world_size=1), Path(cfg.run_dir))


def steps(tr: Trainer, n: int):
    return [tr.train_step() for _ in range(n)]


def params_of(tr: Trainer):
    return {n: p.detach().clone() for n, p in tr.model.named_parameters()}


@pytest.mark.parametrize(
    "extra",
    [
        ("optim.grad_clip=0",),
        # A clip above every step's global norm (about 1.2 here) never triggers, globally or per parameter.
        # Fixed costs: both runs must take the same SLTrain paths (each measures in a run dir of its own).
        ("optim.grad_clip=100", "method=sltrain", "method.sltrain_costs=fixed"),
        ("optim.grad_clip=0", "precision=coat"),  # FP8 moments through CoatAdamW inner optimizers
    ],
    ids=["lost", "sltrain-clip-never-triggers", "coat"],
)
def test_same_run_as_the_ordinary_step_bit_for_bit(tmp_path, smoke_cfg, extra):
    ref = make_trainer(smoke_cfg, tmp_path / "ref", *extra)
    got = make_trainer(smoke_cfg, tmp_path / "ib", *extra, "optim.in_backward=true")
    a, b = steps(ref, 3), steps(got, 3)
    assert [m["loss"] for m in b] == [m["loss"] for m in a]
    # The norm sums the same float64 squares in hook order instead of parameter order: last bits only.
    assert [m["grad_norm"] for m in b] == pytest.approx([m["grad_norm"] for m in a], rel=1e-12)
    pa, pb = params_of(ref), params_of(got)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert all(p.grad is None for p in got.model.parameters())  # freed as each update ran


class EveryMicroBatch:
    """The wrong variant: a gradient sync that calls every backward the final one, so parameters are updated
    from the first micro-batch's partial gradient and again from the second."""

    def __init__(self, inner):
        self.inner = inner

    def prepare(self, final: bool) -> None:
        self.inner.prepare(final=True)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_updating_on_every_micro_batch_is_caught(tmp_path, smoke_cfg):
    ref = make_trainer(smoke_cfg, tmp_path / "ref", "optim.grad_clip=0")
    bad = make_trainer(smoke_cfg, tmp_path / "bad", "optim.grad_clip=0", "optim.in_backward=true")
    bad.parallel.grad_sync = EveryMicroBatch(bad.parallel.grad_sync)
    a, b = steps(ref, 2), steps(bad, 2)
    assert a[0]["loss"] == b[0]["loss"]  # the same start...
    assert a[1]["loss"] != b[1]["loss"]  # ...and the comparison above tells the variants apart
    pa, pb = params_of(ref), params_of(bad)
    assert not all(torch.equal(pa[n], pb[n]) for n in pa)


def test_a_non_finite_gradient_is_not_applied_and_the_run_stops(tmp_path, smoke_cfg):
    tr = make_trainer(smoke_cfg, tmp_path / "nan", "optim.in_backward=true")
    name, first = next(iter(tr.model.named_parameters()))
    poison = {"on": False}
    first.register_hook(lambda g: g * math.nan if poison["on"] else g)  # the test's fault injection
    tr.train_step()
    before, moments = params_of(tr), {k: v.clone() for k, v in tr.optimizer.state[first].items()}
    poison["on"] = True
    with pytest.raises(NonFiniteError, match="step 2: non-finite"):
        tr.train_step()
    assert torch.equal(first.detach(), before[name]) and first.grad is None
    assert all(torch.equal(tr.optimizer.state[first][k], v) for k, v in moments.items())
    # The others were updated during backward (the loss was not known yet); the run stops unsaved.
    assert any(not torch.equal(p, before[n]) for n, p in tr.model.named_parameters() if n != name)
    assert tr.runner.in_backward.skipped_nonfinite == 1
    tr.close()


def test_checkpoints_resume_across_the_two_modes(tmp_path, smoke_cfg):
    """Runs of 4 steps saved at step 2; each resumes in the other mode and continues with the same losses."""
    common = ("optim.grad_clip=0", "train.steps=4", "train.ckpt_interval=2", "train.log_interval=1")
    runs = {}
    for mode in ("false", "true"):
        tr = make_trainer(smoke_cfg, tmp_path / mode, *common, f"optim.in_backward={mode}")
        runs[mode] = tr.fit().losses
        tr.close()
    assert runs["false"] == runs["true"]
    for saved, resumed in (("true", "false"), ("false", "true")):
        into = tmp_path / f"{saved}-into-{resumed}"
        step2 = sorted((tmp_path / saved / "checkpoints").glob("step_*"))[0]
        tr = make_trainer(smoke_cfg, into, *common, f"optim.in_backward={resumed}", f"train.resume={step2}")
        tr.fit()
        tr.close()
        assert len(records(into)) == 2 and [r["loss"] for r in records(into)] == runs[resumed][2:]


def test_refused_combinations_name_their_field(smoke_cfg, tmp_path):
    cases = [
        (["train.nonfinite=skip"], "train.nonfinite"),
        (["parallel.tp=2", "optim.grad_clip=1.0"], "optim.grad_clip"),
    ]
    for overrides, field in cases:  # refused when the config is composed (schema.validate_sections)
        with pytest.raises(ConfigError) as exc:
            smoke_cfg(tmp_path, "optim.in_backward=true", "method.rank=8", *overrides)
        assert exc.value.field == field
    validate_in_backward(smoke_cfg(tmp_path, "optim.in_backward=true", "parallel.tp=2", "optim.grad_clip=0"))
    out = train(
        tmp_path / "cli",
        "experiment=smoke",
        "method.rank=8",
        "optim.in_backward=true",
        "train.nonfinite=skip",
        expect=2,
    )
    assert "megaeff: error: config field 'train.nonfinite'" in out


# ------------------------------------------------------------------------------------------ multi-rank
pool = pool_fixture(2)
MULTI = [
    "experiment=smoke",
    "train.plot=false",
    "train.threads=1",
    "train.ckpt_interval=0",
    "train.eval_interval=0",
    "train.grad_accum=2",
    "method.rank=8",
    "optim.impl=foreach",
]
FSSDP = ["parallel.dp=2", "parallel.dp_impl=fssdp", "train.micro_batch_size=2"]


def run_on_rank(dims, overrides, run_dir, n_steps):
    """`n_steps` trainer steps on this rank; with in_backward, how many parameters were already updated when
    the step's `finish()` began (updates during backward) and whether any gradient is left after the step."""
    tr = Trainer(compose([*MULTI, *overrides, f"run_dir={run_dir}"]), dims, Path(run_dir))
    before_finish = []
    if tr.runner.in_backward is not None:
        sync, finish = tr.parallel.grad_sync, tr.parallel.grad_sync.finish

        def count_then_finish():
            before_finish.append(len(tr.runner.in_backward.stepped))
            finish()

        sync.finish = count_then_finish  # the test's probe on this object only
    ms = [tr.train_step() for _ in range(n_steps)]
    out = dict(
        loss=[m["loss"] for m in ms],
        norm=[m["grad_norm"] for m in ms],
        params=params_of(tr),
        grads_left=[n for n, p in tr.model.named_parameters() if p.grad is not None],
        before_finish=before_finish,
        n_params=len(list(tr.model.parameters())),
        # Squared norm of each first moment (this rank's part) and how many dp ranks hold the same values.
        m2={
            n: (float(tr.optimizer.state[p]["exp_avg"].double().pow(2).sum()), param_meta(p).dp_replicas)
            for n, p in tr.model.named_parameters()
            if "exp_avg" in tr.optimizer.state.get(p, {})
        },
    )
    tr.close()
    return out


def same_on_every_rank(ref, got):
    for a, b in zip(ref, got):
        assert b["loss"] == a["loss"]
        assert b["norm"] == pytest.approx(a["norm"], rel=1e-12)
        assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
        assert b["grads_left"] == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, overrides, during_backward",
    [
        # FSSDP: the same reduce-scatters summed in the same order; only where the update runs differs. A unit's
        # shards are updated as its last reduce-scatter lands: here (3 units, max_inflight=2) the head's during
        # backward, the rest in finish(), the replicated norms and the sparse embedding after their reduction.
        (dict(dp=2), FSSDP, "some"),
        # The bucketed all-reduce: every bucket in finish() (its views are static: nothing to free early).
        (dict(dp=2), ["parallel.dp=2", "train.micro_batch_size=2"], "none"),
        # A pipeline: each stage updates its own parameters during its last backward.
        (dict(pp=2), ["parallel.pp=2", "train.micro_batch_size=4"], "all"),
        # Sequence parallel: the norm gains' partial gradients are all-reduced over tp before they reach .grad.
        (dict(tp=2), ["parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch_size=4"], "all"),
    ],
    ids=["fssdp-dp2", "bucketed-dp2", "pp2", "tp2-sp"],
)
def test_layouts_same_run_bit_for_bit(pool, tmp_path, layout, overrides, during_backward):
    ov = [*overrides, "optim.grad_clip=0"]
    ref = pool.run(run_on_rank, ov, str(tmp_path / "ref"), 2, layout=layout)
    got = pool.run(run_on_rank, [*ov, "optim.in_backward=true"], str(tmp_path / "ib"), 2, layout=layout)
    same_on_every_rank(ref, got)
    for r in got:
        early = r["before_finish"]
        assert len(early) == 2
        if during_backward == "all":
            assert all(e == r["n_params"] for e in early), early
        elif during_backward == "some":
            assert all(0 < e < r["n_params"] for e in early), (early, r["n_params"])
        else:
            assert early == [0, 0]


@pytest.mark.slow
def test_fssdp_clipping_is_layout_independent(pool, tmp_path, smoke_cfg):
    """Per-parameter clipping by the norm of the logical gradient: FSSDP dp2 (shard squares summed over dp, one
    all-reduce per unit) equals one process. AdamW's update hardly sees a per-tensor scale, so the first moments
    are compared: their norms are at most clip x (1 - beta1^t) when every gradient was clipped to `clip`, and
    a variant clipping each shard by its own norm would let them reach sqrt(2) times that. Tolerance: rel 1e-5
    on losses and 1e-4 on squared norms, the FSSDP tests' float32 bound (the reduce-scatter adds the ranks'
    partial gradients in another order than one process does)."""
    clip, n = 0.05, 3
    on = [f"optim.grad_clip={clip}", "optim.in_backward=true"]  # per-tensor norms here are 0.1-1: it triggers
    got = pool.run(run_on_rank, [*FSSDP, *on], str(tmp_path / "ib"), n, layout=dict(dp=2))
    single = make_trainer(smoke_cfg, tmp_path / "single", *on, "train.micro_batch_size=4")
    ref = [m["loss"] for m in steps(single, n)]
    assert got[0]["loss"] == got[1]["loss"] == pytest.approx(ref, rel=1e-5)
    bound = clip * (1 - single.cfg.optim.betas[0] ** n) * (1 + 1e-5)
    names = {p: name for name, p in single.model.named_parameters()}
    for p, st in single.optimizer.state.items():
        logical = float(st["exp_avg"].double().pow(2).sum())
        assert logical <= bound**2, names[p]
        sharded = sum(r["m2"][names[p]][0] / r["m2"][names[p]][1] for r in got)
        assert sharded == pytest.approx(logical, rel=1e-4), names[p]
    assert max(float(st["exp_avg"].norm()) for st in single.optimizer.state.values()) > 0.9 * bound  # it clipped
