"""SLTrain's auto path from costs measured at start-up (megaeff/layers/sltrain_costs.py) and kept in the run dir
(sltrain_cost_file.py), with injected timings: no test here depends on how fast anything runs. The agreement across
ranks, and the cost file's on them, is tested on gloo ranks in tests/distributed/test_context_parallel.py
(test_sltrain_costs_are_the_same_on_every_rank, test_the_cost_file_on_every_rank)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from megaeff.errors import MegaeffError
from megaeff.layers import sltrain_costs
from megaeff.layers.sltrain import SLTrainLinear
from megaeff.layers.sltrain_cost_file import COST_FILE, file_key, load_costs, save_costs
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


def lin(i, o, **kw):
    return SLTrainLinear(i, o, rank=4, alpha=8.0, density=0.1, **kw)


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


def test_the_cost_file_round_trips_exactly(tmp_path):
    path = tmp_path / COST_FILE
    assert load_costs(path) == {}  # no file: nothing known
    costs = {
        file_key((24, 32, 77), True, 256, torch.float32, "cpu"): 1 / 3,  # no short decimal: the bits must survive
        file_key((24, 32, 77), False, 256, torch.float32, "cpu"): 0.1 + 0.2,
        file_key((512, 1376, 21135), True, 1024, torch.bfloat16, "cuda"): 114.25,
    }
    save_costs(path, costs, "cpu")
    assert load_costs(path) == costs
    doc = json.loads(path.read_text())
    row = dict(m=24, n=32, nnz=77, training=False, tokens=256, dtype="float32", device="cpu", c=0.1 + 0.2)
    assert doc["costs"][0] == row  # sorted by key: plain JSON a person can read
    assert set(doc["measured_with"]) == {"torch", "threads", "device"}
    assert [p.name for p in tmp_path.iterdir()] == [COST_FILE]  # the temporary file was renamed into place


def test_a_second_calibration_reads_the_file_and_measures_nothing(tmp_path):
    path = tmp_path / COST_FILE
    first, again = nn.Sequential(lin(32, 24), lin(40, 16)), nn.Sequential(lin(40, 16), lin(32, 24))
    assert calibrate_paths(first, tokens=300, timer=FakeTimer(), cache=path) == 2
    # A machine that would measure 100x costlier sparse kernels: the file's costs win, not one call is timed.
    other = FakeTimer(sparse_train=0.2, sparse_forward=0.05)
    assert calibrate_paths(again, tokens=300, timer=other, cache=path) == 2 and other.calls == []
    for a, b in zip(first, reversed(again)):
        assert b.sparse_costs == a.sparse_costs  # bit for bit
        assert [b.select_path(t) for t in (1, 16, 256, 4096)] == [a.select_path(t) for t in (1, 16, 256, 4096)]
    # The same run measured afresh (no file) would decide otherwise, so the file really decides.
    fresh = nn.Sequential(lin(32, 24))
    calibrate_paths(fresh, tokens=300, timer=other)
    assert fresh[0].sparse_costs[True] == pytest.approx(100 * first[0].sparse_costs[True])


def test_missing_shapes_are_measured_and_added_to_the_file(tmp_path):
    path = tmp_path / COST_FILE
    calibrate_paths(nn.Sequential(lin(32, 24)), tokens=300, timer=FakeTimer(), cache=path)
    before = load_costs(path)
    timer = FakeTimer(sparse_train=4e-3)
    model = nn.Sequential(lin(32, 24), lin(40, 16))
    calibrate_paths(model, tokens=300, timer=timer, cache=path)
    # The new shape only: (training, forward) x ROUNDS x (GEMM, sparse).
    assert sorted(timer.calls) == sorted(["gemm", "sparse_train", "gemm", "sparse_forward"] * ROUNDS)
    after = load_costs(path)
    assert len(after) == 4 and {k: after[k] for k in before} == before  # appended; the old costs kept
    assert model[1].sparse_costs[True] == pytest.approx(expected_cost(16, 40, model[1].nnz, 1e-3, 4e-3))
    # Another call size is another measurement (the kernels' per-call part): measured, not read.
    timer = FakeTimer()
    calibrate_paths(nn.Sequential(lin(32, 24)), tokens=64, timer=timer, cache=path)
    assert timer.calls and len(load_costs(path)) == 6


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"format": "megaeff-sltrain-costs", "version": 2, "costs": []}),
        json.dumps({"format": "megaeff-sltrain-costs", "version": 1, "costs": {}}),
        json.dumps([1, 2]),
        json.dumps(
            {"format": "megaeff-sltrain-costs", "version": 1, "costs": [dict(m=24, n=32, nnz=77, training=True, c=1.0)]}
        ),
        json.dumps(
            {
                "format": "megaeff-sltrain-costs",
                "version": 1,
                "costs": [dict(m=24, n=32, nnz=77, training=1, tokens=256, dtype="float32", device="cpu", c=1.0)],
            }
        ),
        json.dumps(
            {
                "format": "megaeff-sltrain-costs",
                "version": 1,
                "costs": [dict(m=24, n=32, nnz=77, training=True, tokens=256, dtype="float32", device="cpu", c=-1)],
            }
        ),
    ],
    ids=["not-json", "version", "costs-not-list", "not-object", "missing-keys", "training-not-bool", "negative-c"],
)
def test_a_bad_cost_file_is_one_error_naming_it(tmp_path, text):
    path = tmp_path / COST_FILE
    path.write_text(text)
    timer = FakeTimer()
    with pytest.raises(MegaeffError, match=f"SLTrain cost file '{path}': unreadable .*method.sltrain_costs=fixed"):
        calibrate_paths(nn.Sequential(lin(32, 24)), timer=timer, cache=path)
    assert timer.calls == [] and path.read_text() == text  # nothing measured, the file left for the user to see


def test_the_trainer_keeps_the_constants_with_fixed_costs(tmp_path, smoke_cfg):
    """`method.sltrain_costs=fixed` leaves every layer on the constants: nothing measured, no cost file."""
    from megaeff.distributed.dims import ParallelDims
    from megaeff.train.trainer import Trainer

    cfg = smoke_cfg(tmp_path, "method=sltrain", "method.rank=8", "method.sltrain_costs=fixed")
    trainer = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), tmp_path)
    try:
        layers = [m for m in trainer.model.modules() if isinstance(m, SLTrainLinear)]
        assert layers and not any(m.sparse_costs for m in layers)
        assert not (tmp_path / COST_FILE).exists()
    finally:
        trainer.close()


def test_the_trainer_measures_by_default_and_a_resume_reads_the_run_dirs_costs(tmp_path, smoke_cfg, monkeypatch):
    """The default measures every SLTrain layer at start-up and keeps the costs in the run dir; the resumption
    (another process, here another Trainer with no measurement possible) takes them from there."""
    from megaeff.distributed.dims import ParallelDims
    from megaeff.train.trainer import Trainer

    def costs_of(trainer):
        return {n: dict(m.sparse_costs) for n, m in trainer.model.named_modules() if isinstance(m, SLTrainLinear)}

    sltrain_costs.measured_sparse_cost.cache_clear()
    cfg = smoke_cfg(
        tmp_path, "method=sltrain", "method.rank=8", "train.steps=1", "train.ckpt_interval=1", "optim.warmup_steps=0"
    )
    assert cfg.method.sltrain_costs == "measured"
    trainer = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), tmp_path)
    try:
        trainer.fit()
        measured = costs_of(trainer)
    finally:
        trainer.close()
    assert measured and all(c for c in measured.values())
    keys = {(m, n, nnz) for m, n, nnz, *_ in load_costs(tmp_path / COST_FILE)}
    assert keys and len(load_costs(tmp_path / COST_FILE)) == 2 * len(keys)  # every shape, training and forward

    def no_timing(*a, **k):
        raise AssertionError("measured although the run dir holds the costs")

    sltrain_costs.measured_sparse_cost.cache_clear()
    monkeypatch.setattr(sltrain_costs, "measure_sparse_cost", no_timing)
    cfg = smoke_cfg(
        tmp_path, "method=sltrain", "method.rank=8", "train.steps=2", "train.ckpt_interval=1", "optim.warmup_steps=0"
    )
    resumed = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), tmp_path)
    try:
        assert resumed.resumed_from is not None and resumed.step == 1
        assert costs_of(resumed) == measured
    finally:
        resumed.close()
        sltrain_costs.measured_sparse_cost.cache_clear()
