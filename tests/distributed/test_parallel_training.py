"""Tensor (+ sequence) and data parallelism end to end: `megaeff.train parallel=tp2_dp2` on 4 ranks reproduces the
single-process run of each linear method (per-step losses over 10 steps and the final parameters, float32, relative
1e-5), checkpoints move between layouts, and bad layouts fail at once with one error naming the field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megaeff.config.validate import validate_config
from megaeff.errors import ConfigError
from tests.distributed.harness import free_port, pool_fixture
from tests.helpers import assert_same_run, cli_env, compose, records, train, train_on_pool

pytestmark = pytest.mark.slow
pool = pool_fixture(4)

STEPS = 10
COMMON = [
    "experiment=smoke",
    f"train.steps={STEPS}",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.plot=false",
    "optim.warmup_steps=2",
    "method.rank=8",
    "method.sltrain_costs=fixed",  # SLTrain: the same paths in every layout (measured costs differ per shard shape)
    f"train.ckpt_interval={STEPS}",
]
SINGLE = ["train.micro_batch_size=4", "train.grad_accum=2"]
# tp2 x dp2: the same global batch of 8 (micro 2 x dp 2 x accum 2); a small bucket gives several buckets.
TP2_DP2 = ["train.micro_batch_size=2", "train.grad_accum=2", "parallel.bucket_mb=0.02"]
TP2_DP2_RANKS = dict(tp=2, dp=2)  # the module's rank pool runs the tp2 x dp2 cases (the others use the CLI)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process reference of each method, run once for the module."""
    root = tmp_path_factory.mktemp("single")
    runs = {}

    def get(method):
        if method not in runs:
            runs[method] = root / method
            train(runs[method], *COMMON, f"method={method}", *SINGLE)
        return runs[method]

    return get


# Dense under tp2_dp2 trains and is compared with its single-process losses after a layout move in
# test_dcp_checkpoint.py (pp2_dp2_virtual -> tp2_dp2), and its layers against one process in
# test_tensor_parallel.py; here the compact methods, whose tensor-parallel splits are their own.
@pytest.mark.parametrize("method", ["lost", "sltrain"])
def test_tp2_dp2_matches_single_process(pool, single, tmp_path, method):
    train_on_pool(
        pool, tmp_path / "run", *COMMON, f"method={method}", "parallel=tp2_dp2", *TP2_DP2, layout=TP2_DP2_RANKS
    )
    assert_same_run(single(method), tmp_path / "run", STEPS)
    rec = records(tmp_path / "run")[0]
    # Every gradient is reduced once per step over dp (in buckets), and the TP regions talk over tp.
    assert rec["comm_bytes/dp_cp/all_reduce"] == rec["mem_grads_bytes"]
    assert rec["comm_bytes/tp/all_reduce"] > 0


def test_sequence_parallel_lowrank_matches_single_process(pool, single, tmp_path):
    train_on_pool(
        pool, tmp_path / "run", *COMMON, "method=lowrank", "parallel=tp2_dp2_sp", *TP2_DP2, layout=TP2_DP2_RANKS
    )
    assert_same_run(single("lowrank"), tmp_path / "run", STEPS)
    rec = records(tmp_path / "run")[0]
    assert rec["comm_bytes/tp/all_gather"] > 0 and rec["comm_bytes/tp/reduce_scatter"] > 0


def test_sequence_parallel_bytes_are_megatrons(tmp_path):
    """Dense tp2 + SP: per block the attention and MLP inputs are all-gathered once (shared by q/k/v and
    gate/up) and o/down reduce-scattered, plus the embedding's reduce-scatter and the head's all-gather: 2L+1
    all-gathers of the full B x T x h activation forward, and their conjugates backward."""
    train(
        tmp_path / "run",
        *COMMON,
        "method=dense",
        "parallel=tp2_sp",
        "train.steps=1",
        "optim.warmup_steps=0",
        "train.ckpt_interval=0",
        "train.micro_batch_size=4",
        "train.grad_accum=1",
        nproc=2,
    )
    rec = records(tmp_path / "run")[0]
    activation = 4 * 32 * 32 * 4  # smoke: batch 4 x seq 32 x dim 32, fp32
    per_direction = (2 * 2 + 1) * activation  # 2 layers
    assert rec["comm_bytes/tp/all_gather"] == 2 * per_direction
    assert rec["comm_bytes/tp/reduce_scatter"] == 2 * per_direction


def test_moe_data_parallel_matches_accumulation(tmp_path):
    """An MoE model (4 experts, top-2, balance loss on) over dp=2 equals one process accumulating the same
    micro-batches: the balance loss is a per-micro-batch mean, so the split must be the same, not the batch."""
    args = [*COMMON, "model.moe_experts=4", "model.moe_aux_loss_coef=0.01", "train.micro_batch_size=2"]
    train(tmp_path / "single", *args, "train.grad_accum=2")
    train(tmp_path / "dp2", *args, "train.grad_accum=1", "parallel=dp2", nproc=2)
    assert_same_run(tmp_path / "single", tmp_path / "dp2", STEPS)
    assert all(r["moe_aux_loss"] > 0 for r in records(tmp_path / "dp2"))


@pytest.mark.parametrize("impl", ["fssdp", "ep"])
def test_distributed_experts_match_single_process(tmp_path, impl):
    """Expert FSSDP and fixed expert parallelism over dp=2: the router loads are all-reduced, so each micro-batch's
    balance loss is that of the tokens of every rank, as one process running the dp x micro batch. Steps 1-5
    distributed, then a resume in one process (replicated experts) from the expert checkpoint: the same run."""
    args = [*COMMON, "method=lost", "model.moe_experts=4", "model.moe_aux_loss_coef=0.01", "train.grad_accum=1"]
    train(tmp_path / "single", *args, "train.micro_batch_size=4")
    run = tmp_path / "run"
    out = train(
        run,
        *args,
        "train.micro_batch_size=2",
        "parallel=dp2",
        f"parallel.expert_impl={impl}",
        "train.exit_interval=5",
        nproc=2,
        expect=1,
    )  # torchrun reports the requeue exit 75 as 1
    assert "checkpoint saved at step 5" in out
    train(run, *args, "train.micro_batch_size=4")
    assert_same_run(tmp_path / "single", run, STEPS)


def test_checkpoints_move_between_layouts(single, tmp_path):
    """Steps 1-5 in one process, 6-10 under tp2 (sequence parallel): the uninterrupted single-process run, through
    the CLI (SLTrain: sparse values are split by the logical support). The other directions and layouts are
    covered by tests/distributed/test_dcp_checkpoint.py on a RankPool."""
    b = tmp_path / "single_then_tp"
    train(b, *COMMON, "method=sltrain", *SINGLE, "train.exit_interval=5", expect=75)
    train(b, *COMMON, "method=sltrain", "parallel=tp2_sp", *SINGLE, nproc=2)
    assert_same_run(single("sltrain"), b, STEPS)


def test_deepspeed_launcher_tp2_dp2(single, tmp_path):
    """The `deepspeed` launcher (its own runner, --local_rank=N per process, CPU accelerator here)."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            # The launcher of this interpreter's environment, found even when its bin/ is not on PATH.
            shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed",
            "--num_gpus",
            "4",
            "--master_port",
            str(free_port()),
            "--module",
            "megaeff.train",
            *COMMON,
            "method=lost",
            "parallel=tp2_dp2",
            *TP2_DP2,
            f"run_dir={run}",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--local_rank=3" in proc.stdout + proc.stderr
    assert_same_run(single("lost"), run, STEPS)


BAD_LAYOUTS = [
    (["parallel.tp=3", "parallel.dp=1"], "parallel"),  # 3 x 1 ranks != 2
    (["parallel.tp=3"], "parallel.dp"),  # 2 ranks do not divide by 3
    (["parallel=tp2", "model.n_heads=3", "model.dim=48"], "model.n_heads"),
    (["parallel=tp2", "model.ffn_dim=63"], "model.ffn_dim"),
    (["parallel=tp2", "parallel.sequence_parallel=true", "data.seq_len=31"], "data.seq_len"),
    (["parallel=tp2", "model.vocab_size=265"], "model.vocab_size"),
]


@pytest.mark.parametrize("args,field", BAD_LAYOUTS)
def test_bad_layouts_are_refused_for_the_world(args, field):
    """What the CLI checks on every rank before any process group (validate_config with the world size)."""
    with pytest.raises(ConfigError) as exc:
        validate_config(compose([*COMMON, *args]), world_size=2)
    assert exc.value.field == field


def test_bad_layout_fails_every_rank_before_any_group_hangs(tmp_path):
    """The same check under torchrun: both ranks exit at once with the one-line error, none waits in a group."""
    args, field = BAD_LAYOUTS[2]
    out = train(tmp_path / "run", *COMMON, *args, nproc=2, expect=1)
    assert f"config field '{field}'" in out
