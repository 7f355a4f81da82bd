"""Pipeline parallelism end to end: GPipe, 1F1B and interleaved 1F1B at pp = 2 and 4 reproduce the single-process
run (per-step losses over 10 steps, validation losses and final parameters, float32, relative 1e-5); checkpoints
written per stage load into another pipeline degree; bad pipeline configs fail with one error naming the field.
The composed tp2 x pp2 x dp2 layout (sequence parallel, 8 ranks) runs in test_fssdp_training.py with FSSDP; with
the all-reduce data parallelism its parts are proven at 4 ranks (tp2_dp2 in test_parallel_training.py, pp2 x dp2
in test_dcp_checkpoint.py), which keeps one 8-rank run instead of two in CI's 30 minutes."""

from __future__ import annotations

import pytest

from megaeff.config.validate import validate_config
from megaeff.errors import ConfigError
from tests.distributed.harness import pool_fixture
from tests.helpers import assert_same_run, compose, records, train, train_on_pool

pytestmark = pytest.mark.slow
pool = pool_fixture(4)

STEPS = 10
# 8 blocks: pp=4 x 2 chunks still gets one block per virtual stage; 4 micro-batches per step (divisible by pp).
COMMON = [
    "experiment=smoke",
    "model.n_layers=8",
    f"train.steps={STEPS}",
    "train.log_interval=1",
    "train.eval_interval=5",
    "train.plot=false",
    "optim.warmup_steps=2",
    f"train.ckpt_interval={STEPS}",
    "train.micro_batch_size=2",
    "train.grad_accum=4",
]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    train(run, *COMMON)
    return run


# Every schedule at pp=4, on the module's 4 ranks. pp=2 runs in test_dcp_checkpoint.py (interleaved with virtual
# stages: pp2_dp2_virtual; 1F1B: pp2_dp2) and in the resume test below, through the CLI.
@pytest.mark.parametrize("pp,schedule,virtual", [(4, "gpipe", 1), (4, "1f1b", 1), (4, "interleaved", 2)])
def test_schedules_match_single_process(pool, single, tmp_path, pp, schedule, virtual):
    train_on_pool(
        pool,
        tmp_path / "run",
        *COMMON,
        f"parallel.pp={pp}",
        f"parallel.pp_schedule={schedule}",
        f"parallel.pp_virtual={virtual}",
        layout=dict(pp=pp),
    )
    assert_same_run(single, tmp_path / "run", STEPS)
    rec = records(tmp_path / "run")[-1]
    assert 0.0 < rec["pp_idle_fraction"] < 1.0  # the bubble, measured as time blocked on receives
    assert rec["comm_bytes/pp/p2p_send"] > 0
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    # Sharded (DCP): every rank wrote its own stage's tensors.
    assert sorted(p.name for p in ckpt.glob("__*.distcp")) == [f"__{r}_0.distcp" for r in range(pp)]


def test_stage_checkpoints_resume_on_another_degree(single, tmp_path):
    """Steps 1-5 on pp=4 (per-stage files), 6-10 on pp=2 with uneven explicit boundaries: the single run."""
    run = tmp_path / "run"
    train(run, *COMMON, "parallel.pp=4", "train.exit_interval=5", nproc=4, expect=1)  # torchrun reports exit 75 as 1
    train(run, *COMMON, "parallel.pp=2", "parallel.pp_boundaries=[3]", nproc=2)
    assert_same_run(single, run, STEPS)


@pytest.mark.parametrize(
    "overrides,world,field",
    [
        (["model.n_layers=3", "parallel.pp=2"], 2, "parallel.pp"),  # 3 blocks, 2 stages
        (
            ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2", "train.grad_accum=3"],
            2,
            "train.grad_accum",
        ),  # 3 micro-batches, pp 2
        (["parallel.pp=2", "parallel.pp_virtual=2"], 2, "parallel.pp_virtual"),  # chunks need interleaved
        (["parallel.pp=2", "parallel.pp_boundaries=[8]"], 2, "parallel.pp_boundaries"),  # out of range
        (["parallel.pp=4", "parallel.pp_boundaries=[2,2,5]"], 4, "parallel.pp_boundaries"),  # not increasing
        (["parallel.pp=2", "parallel.pp_schedule=zigzag"], 2, "parallel.pp_schedule"),
    ],
)
def test_bad_pipeline_configs(overrides, world, field):
    with pytest.raises(ConfigError) as exc:  # a bad choice (pp_schedule=zigzag) already fails to compose
        validate_config(compose([*COMMON, *overrides]), world_size=world)
    assert exc.value.field == field
