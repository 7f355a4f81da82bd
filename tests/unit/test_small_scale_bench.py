"""tools/bench/small_scale.py's logic that does not train: bits per byte, the step calibration and the table."""

from __future__ import annotations

import math

import pytest

from tools.bench.small_scale import (
    PUBLISHED_60M,
    bits_per_byte,
    calibrate_steps,
    format_table,
    rank_overrides,
    run_seconds,
    summary_line,
    table_rows,
)

# A few float operations on values of order 1e6: relative error a few ulps (~1e-16 each); 1e-12 leaves margin.
REL = 1e-12


def test_bits_per_byte():
    # Byte tokens (one byte each): bits per byte is the loss in bits.
    assert bits_per_byte(1.5, 1000, 1000) == pytest.approx(1.5 / math.log(2), rel=REL)
    # A uniform guess over 4096 ids costs 12 bits a token; 3 bytes a token on average: 4 bits a byte.
    assert bits_per_byte(math.log(4096), 300_000, 900_000) == pytest.approx(4.0, rel=REL)


def fit_evaluations(steps: int, interval: int) -> int:
    """The evaluations Trainer.fit runs: every `interval` steps before the last (0: none), then one at the end."""
    return sum(1 for s in range(1, steps + 1) if interval and s % interval == 0 and s < steps) + 1


@pytest.mark.parametrize("steps,points", [(10, 4), (10, 0), (7, 3), (1, 4), (200, 5)])
def test_run_seconds_counts_what_a_run_does(steps, points):
    t = {"setup_s": 3.0, "step_s": 2.0, "eval_batch_s": 0.5, "eval_batches": 17}
    interval = max(steps // points, 1) if points else 0
    cap = 2
    evals = fit_evaluations(steps, interval) * cap + t["eval_batches"]  # + train_one's full-split evaluation
    assert run_seconds(t, steps, points, cap) == pytest.approx(3.0 + 2.0 * steps + 0.5 * evals, rel=REL)


def test_calibration_fills_the_budget_and_no_more():
    timings = {
        "a": {"setup_s": 10.0, "step_s": 1.0, "eval_batch_s": 0.0, "eval_batches": 1},
        "b": {"setup_s": 10.0, "step_s": 3.0, "eval_batch_s": 0.0, "eval_batches": 1},
    }
    # 20 s of set-up + 4 s a step must fit 0.5 x 240 s: 25 steps exactly.
    assert calibrate_steps(timings, 240.0, 0.5, 0, 1) == 25
    timings["a"]["eval_batch_s"] = 1.3  # with evaluations: the largest fitting count, whatever it is
    steps = calibrate_steps(timings, 600.0, 0.9, 4, 2)
    total = lambda s: sum(run_seconds(t, s, 4, 2) for t in timings.values())  # noqa: E731
    assert total(steps) <= 540.0 < total(steps + 1)
    assert calibrate_steps(timings, 20.0, 0.9, 0, 1) == 0  # the set-up alone overruns


def test_table_layout_and_summary():
    def run(ppl, params, state):
        return {"val_ppl": ppl, "val_loss": math.log(ppl), "params": params, "state_bytes": state, "tokens": 81920}

    runs = {
        "dense": run(100.0, 5e6, 80 * 2**20),
        "galore": run(110.0, 5e6, 64 * 2**20),
        "lost": run(90.0, 3e6, 52 * 2**20),
    }
    rows = table_rows(runs, val_tokens=1000, val_bytes=3000)
    assert [r["method"] for r in rows] == ["dense", "galore", "lost"]
    galore = rows[1]
    assert galore["ppl_vs_dense"] == pytest.approx(1.1, rel=REL)
    assert galore["state_vs_dense"] == pytest.approx(0.8, rel=REL)
    assert galore["bpb"] == pytest.approx(math.log2(110.0) / 3, rel=REL)  # log2(ppl) bits a token, 3 bytes a token
    assert (galore["published_ppl_60m"], galore["published_mem_gb_60m"]) == PUBLISHED_60M["galore"][:2]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["method", "val", "ppl"] and "published 60M" in lines[0]
    assert lines[3].split()[:4] == ["galore", "110.00", f"{math.log2(110) / 3:.3f}", "1.100"]
    assert "34.88 (0.24G)" in lines[3] and "32.25 (-)" in lines[4]  # LOST's memory is not published
    assert summary_line(rows) == (
        "summary vs dense (81,920 tokens each): galore ppl x1.100 state x0.800; lost ppl x0.900 state x0.650"
    )


def test_ranks_keep_the_papers_ratios():
    # SLTrain keeps alpha / r = 0.25 (its 60M setting: alpha 32, r 128); every low-rank method gets the same r.
    assert rank_overrides("sltrain", 64) == ["method.rank=64", "method.alpha=16"]
    assert rank_overrides("galore", 64) == ["optim.galore_rank=64"]
    assert rank_overrides("dense", 64) == []
