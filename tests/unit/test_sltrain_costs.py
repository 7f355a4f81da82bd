"""SLTrain's auto path from costs measured at start-up (megaeff/layers/sltrain_costs.py), with injected timings:
no test here depends on how fast anything runs. The agreement across ranks is tested on gloo ranks in
tests/distributed/test_context_parallel.py (test_sltrain_costs_are_the_same_on_every_rank)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from megaeff.layers import sltrain_costs
from megaeff.layers.sltrain import SLTrainLinear
from megaeff.layers.sltrain_costs import (
    MAX_TOKENS,
    MIN_TOKENS,
    ROUNDS,
    calibrate_paths,
    measure_sparse_cost,
    measured_shape,
)
from megaeff.layers.sltrain_ops import SPARSE_COST_TRAIN, sparse_token_limit


class FakeTimer:
    """Seconds by what is timed. The functions timed need not run here: the measurement's warm-up runs each once,
    so the measured code itself is exercised."""

    def __init__(self, gemm=1e-3, sparse_train=2e-3, sparse_forward=5e-4, run=False):
        self.seconds = dict(gemm=gemm, sparse_train=sparse_train, sparse_forward=sparse_forward)
        self.calls, self.run = [], run

    def __call__(self, what, fn):
        self.calls.append(what)
        if self.run:
            fn()
        return self.seconds[what]


def expected_cost(m, n, nnz, gemm, sparse):
    # The same token count T for both: (sparse / (T nnz')) / (gemm / (T m' n')).
    m2, n2, nnz2 = measured_shape(m, n, nnz)
    return (sparse / nnz2) / (gemm / (m2 * n2))


def test_measured_cost_is_the_ratio_of_the_timed_rates():
    m, n, nnz = 24, 40, 96
    timer = FakeTimer()
    for training, sparse in ((True, 2e-3), (False, 5e-4)):
        c = measure_sparse_cost(m, n, nnz, torch.float32, "cpu", training, timer)
        assert c == pytest.approx(expected_cost(m, n, nnz, 1e-3, sparse), rel=1e-12)
    assert timer.calls == ["gemm", "sparse_train"] * ROUNDS + ["gemm", "sparse_forward"] * ROUNDS  # in alternation
    # Twice the sparse time is twice the cost; twice the GEMM time, half.
    base = measure_sparse_cost(m, n, nnz, torch.float32, "cpu", True, FakeTimer(run=False))
    assert measure_sparse_cost(m, n, nnz, torch.float32, "cpu", True, FakeTimer(sparse_train=4e-3, run=False)) == (
        pytest.approx(2 * base)
    )
    assert measure_sparse_cost(m, n, nnz, torch.float32, "cpu", True, FakeTimer(gemm=2e-3, run=False)) == (
        pytest.approx(base / 2)
    )


def test_measured_at_the_runs_call_size_within_bounds(monkeypatch):
    real = sltrain_costs.measure_tokens
    assert [real(t) for t in (None, 1, 2048, 300)] == [sltrain_costs.DEFAULT_TOKENS, MIN_TOKENS, MAX_TOKENS, 300]
    got = []
    monkeypatch.setattr(sltrain_costs, "measure_sparse_cost", lambda *a, **k: got.append((a, k)) or 1.0)
    sltrain_costs.measured_sparse_cost.cache_clear()
    model = nn.Sequential(SLTrainLinear(16, 8, rank=2, alpha=1.0, density=0.25))
    calibrate_paths(model, tokens=300, timer=FakeTimer())  # injected timer: the token count is passed on
    calibrate_paths(model, tokens=4096)  # the real (cached) measurement: clamped before it becomes a cache key
    assert [a[-1] for a, _ in got[:2]] == [300, 300] and [k["tokens"] for _, k in got[2:]] == [MAX_TOKENS] * 2
    sltrain_costs.measured_sparse_cost.cache_clear()


def test_wide_shapes_are_measured_on_a_block_of_the_same_density():
    assert measured_shape(512, 1376, 21135) == (512, 1024, round(21135 * 1024 / 1376))
    m2, n2, nnz2 = measured_shape(11008, 4096, int(0.03 * 11008 * 4096))
    assert (m2, n2) == (1024, 1024) and abs(nnz2 / (m2 * n2) - 0.03) < 1e-6
    assert measured_shape(3, 5, 1) == (3, 5, 1)


def test_the_layer_decides_from_its_measured_cost():
    layer = SLTrainLinear(512, 512, rank=128, alpha=32.0, density=0.03, name="q")
    fixed = sparse_token_limit(512, 512, 128, layer.nnz, True)
    assert layer.token_limit() == fixed and "not calibrated yet" in layer.describe()  # uncalibrated: constants
    # A machine whose sparse kernels cost 10x the fitted constant: the crossover moves far below the fixed one.
    layer.sparse_costs = {True: 10 * SPARSE_COST_TRAIN, False: 500.0}
    limit = layer.token_limit()
    assert limit == sparse_token_limit(512, 512, 128, layer.nnz, True, 10 * SPARSE_COST_TRAIN) and limit < fixed / 5
    t = int((limit + fixed) / 2)  # between the two crossovers: the two rules disagree
    assert layer.select_path(t) == "dense" and "measured at start-up: 700.0" in layer.describe()
    layer.costs = "fixed"  # the switch keeps the constants even when measured costs are present
    assert layer.token_limit() == fixed and layer.select_path(t) == "sparse" and not layer.wants_measured_costs
    # Sparse kernels as cheap as GEMM: sparse at any batch; forced paths ignore costs.
    layer.costs, layer.sparse_costs = "measured", {True: 1.0, False: 1.0}
    assert math.isinf(layer.token_limit()) and layer.select_path(10**6) == "sparse"
    layer.path = "dense"
    assert layer.select_path(1) == "dense" and not layer.wants_measured_costs
    with pytest.raises(ValueError, match="unknown SLTrain costs 'timed'"):
        SLTrainLinear(8, 8, rank=2, alpha=1.0, density=0.5, costs="timed")


def test_calibration_measures_each_distinct_shape_once():
    def lin(i, o, **kw):
        return SLTrainLinear(i, o, rank=4, alpha=8.0, density=0.1, **kw)

    model = nn.Sequential(lin(32, 24), lin(32, 24), lin(40, 16), lin(32, 24, costs="fixed"), lin(40, 16, path="sparse"))
    timer = FakeTimer(run=False)
    assert calibrate_paths(model, timer=timer) == 3
    # 2 distinct shapes x (training, forward) x ROUNDS x (GEMM, sparse)
    assert sorted(timer.calls) == sorted(["gemm", "sparse_train", "gemm", "sparse_forward"] * 2 * ROUNDS)
    a, b, c, fixed, forced = model
    assert a.sparse_costs == b.sparse_costs != c.sparse_costs
    assert a.sparse_costs[True] == pytest.approx(expected_cost(24, 32, a.nnz, 1e-3, 2e-3))
    assert fixed.sparse_costs == {} and forced.sparse_costs == {}
    assert calibrate_paths(nn.Sequential(lin(8, 8, costs="fixed"))) == 0  # nothing to measure, nothing timed


def test_one_disturbed_round_does_not_move_the_cost():
    """The median over paired rounds: a round in which another job slowed the sparse product 1000x (or the GEMM)
    leaves c unchanged (a mean over rounds would move by about 200x)."""
    base = measure_sparse_cost(24, 40, 96, torch.float32, "cpu", True, FakeTimer(run=False))
    for slowed in ("sparse_train", "gemm"):
        calls = []

        def timer(what, fn, calls=calls, slowed=slowed):
            calls.append(what)
            return (1000.0 if what == slowed and len(calls) in (3, 4) else 1.0) * FakeTimer().seconds[what]

        assert measure_sparse_cost(24, 40, 96, torch.float32, "cpu", True, timer) == pytest.approx(base, rel=1e-12)


def test_the_measurement_stops_at_its_time_budget():
    slow = FakeTimer(gemm=sltrain_costs.BUDGET_S, sparse_train=sltrain_costs.BUDGET_S)
    c = measure_sparse_cost(24, 40, 96, torch.float32, "cpu", True, slow)
    assert slow.calls == ["gemm", "sparse_train"] and c == pytest.approx(expected_cost(24, 40, 96, 1.0, 1.0))


def test_real_timer_runs_once_and_the_measurement_is_cached(monkeypatch):
    runs = []
    monkeypatch.setattr(sltrain_costs, "measure_sparse_cost", lambda *a, **k: runs.append(a) or 1.0)
    sltrain_costs.measured_sparse_cost.cache_clear()
    for _ in range(3):
        assert sltrain_costs.measured_sparse_cost(9, 7, 3, torch.float32, "cpu", True) == 1.0
    assert len(runs) == 1
    sltrain_costs.measured_sparse_cost.cache_clear()
    count = []
    assert sltrain_costs.seconds("x", lambda: count.append(1)) >= 0 and len(count) == 1


@pytest.mark.parametrize("costs", ["fixed", "measured"])
def test_the_trainer_calibrates_only_when_asked(tmp_path, costs):
    """`method.sltrain_costs=measured` makes the trainer measure every SLTrain layer at start-up; `fixed` (the
    default) leaves every layer on the constants."""
    from megaeff.config import compose
    from megaeff.distributed.dims import ParallelDims
    from megaeff.train.trainer import Trainer

    sltrain_costs.measured_sparse_cost.cache_clear()
    cfg = compose(
        [
            "experiment=smoke",
            "method=sltrain",
            "method.rank=8",
            f"method.sltrain_costs={costs}",
            f"run_dir={tmp_path}",
        ]
    )
    trainer = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), tmp_path)
    try:
        layers = [m for m in trainer.model.modules() if isinstance(m, SLTrainLinear)]
        assert layers
        measured = [bool(m.sparse_costs) for m in layers]
        assert all(measured) if costs == "measured" else not any(measured)
    finally:
        trainer.close()
        sltrain_costs.measured_sparse_cost.cache_clear()
