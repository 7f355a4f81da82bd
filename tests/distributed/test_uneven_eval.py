"""Evaluation whose batch count is not a multiple of dp: every data-parallel implementation finishes and equals
the single-process evaluation.

Batches are dealt round-robin over the dp ranks, so with 1, 2, 3 or 5 batches at dp=4 some ranks have fewer
(or none). A forward may hold dp collectives (FSSDP's gathers and sparse embedding all-to-all, the expert
exchanges of expert FSSDP and EP): a rank that skipped it would leave the others waiting forever (the harness
turns such a hang into RankTimeout). What must hold: the same number of validation tokens exactly (a padding
batch that counted its tokens, or a batch dealt twice or never, changes it), and the same token-weighted loss up
to fp32 rounding of the forward (ranks run the same weights on other batch shapes; the sums are float64):
relative 1e-6 is about ten float32 ulps of a per-token loss, while dropping or doubling one of the batches moves
the mean by the spread of per-batch losses (measured here: > 1e-3).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.harness import pool_fixture
from tests.helpers import compose

pytestmark = pytest.mark.slow

DP = 4
COUNTS = (1, 2, 3, 5)
# Wide enough that FSSDP shards every block's compact tensors (the smoke model's factors are below one group
# per rank and stay replicated).
COMMON = [
    "experiment=smoke",
    "model.dim=128",
    "model.ffn_dim=352",
    "model.n_heads=4",
    "method=lost",
    "method.rank=8",
    "train.plot=false",
    "train.threads=1",
    "train.eval_batch_size=3",
]
LAYOUTS = {
    "allreduce": [],
    "fssdp": ["parallel.dp_impl=fssdp"],
    "expert_fssdp": ["model.moe_experts=4", "parallel.expert_impl=fssdp"],
    "expert_ep": ["model.moe_experts=4", "parallel.expert_impl=ep"],
}

pool = pool_fixture(DP)


def _evaluations(dims, overrides, run_dir):
    """Build the trainer on this rank and evaluate with each batch count; the validation records by count."""
    from megaeff.train.trainer import Trainer

    cfg = compose([*overrides, f"run_dir={run_dir}"])
    trainer = Trainer(cfg, dims, Path(run_dir))
    out = {}
    try:
        for n in COUNTS:
            trainer.cfg.train.eval_max_batches = n
            out[n] = trainer.evaluate()
    finally:
        trainer.close()
    return out


def _single_process(overrides, run_dir):
    from megaeff.distributed.dims import ParallelDims

    cfg = compose([*overrides, f"run_dir={run_dir}"])
    return _evaluations(ParallelDims.from_config(cfg.parallel, world_size=1), overrides, run_dir)


@pytest.mark.parametrize("impl", list(LAYOUTS))
def test_every_rank_runs_the_same_forwards(pool, tmp_path, impl):
    moe = [o for o in LAYOUTS[impl] if o.startswith("model.")]
    ref = _single_process([*COMMON, *moe], tmp_path / "single")
    got = pool.run(
        _evaluations,
        [*COMMON, *LAYOUTS[impl], f"parallel.dp={DP}"],
        str(tmp_path / "dp"),
        layout=dict(dp=DP),
        timeout=240,
    )
    losses = [ref[n]["val_loss"] for n in COUNTS]
    assert max(losses) - min(losses) > 1e-3 * min(losses), "batches too alike to tell a lost one from the rest"
    for n in COUNTS:
        for rank in range(DP):
            assert got[rank][n]["val_tokens"] == ref[n]["val_tokens"], (n, rank)
            assert got[rank][n]["val_loss"] == pytest.approx(ref[n]["val_loss"], rel=1e-6), (n, rank)
