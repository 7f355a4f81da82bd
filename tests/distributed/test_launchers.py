"""Two gloo ranks started the three ways users start megaeff (torchrun, the deepspeed launcher's `--local_rank`,
srun's SLURM_* variables) reproduce the single-process run: same per-step losses and validation loss, one shared
run directory, Hydra files written once."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from tests.helpers import PYTHON, cli_env

pytestmark = pytest.mark.slow

COMMON = [
    "experiment=smoke",
    "train.steps=6",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.plot=false",
    "optim.warmup_steps=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"], [r["val_loss"] for r in recs if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run(
        [PYTHON, "-m", "megaeff.train", *COMMON, "train.micro_batch_size=4", "train.grad_accum=2", f"run_dir={run}"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return losses(run)


def spawn_two(argv_for_rank, env_for_rank, cwd):
    procs = [
        subprocess.Popen(
            argv_for_rank(r), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_for_rank(r), cwd=cwd
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


def assert_matches(reference, run_dir):
    ref_losses, ref_val = reference
    got_losses, got_val = losses(run_dir)
    assert len(got_losses) == len(ref_losses) == 6  # written once, by rank 0 only
    assert got_losses == pytest.approx(ref_losses, rel=1e-5)
    assert got_val == pytest.approx(ref_val, rel=1e-5)
    assert (run_dir / ".hydra/config.yaml").is_file()


def test_torchrun_two_ranks_match_single_process(reference, tmp_path):
    """No run_dir given: rank 0 picks the timestamped directory and both ranks use it."""
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "megaeff.train",
            *COMMON,
            "train.micro_batch_size=4",
            "train.grad_accum=1",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    assert_matches(reference, runs[0])
    assert "dp=2" in proc.stdout
    # Every byte counted: per step, the fp32 gradients (bucketed, over dp x cp), two float64 scalars (token
    # count, loss) over dp, and one float64 stop flag over the world group.
    rec = json.loads((runs[0] / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["comm_bytes/dp_cp/all_reduce"] == rec["mem_params_bytes"]
    assert rec["comm_bytes/dp/all_reduce"] == 16
    assert rec["comm_bytes/world/all_reduce"] == 8
    assert rec["comm_bytes"] == rec["mem_params_bytes"] + 24


def test_deepspeed_style_local_rank_argument(reference, tmp_path):
    port = free_port()
    run = tmp_path / "run"

    def argv(r):
        return [PYTHON, "-m", "megaeff.train", f"--local_rank={r}", *COMMON, "train.micro_batch_size=4",
                "train.grad_accum=1", f"run_dir={run}"]  # fmt: skip

    def env(r):
        return cli_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    spawn_two(argv, env, tmp_path)
    assert_matches(reference, run)


def test_slurm_environment_without_torchrun(reference, tmp_path):
    port = free_port()
    run = tmp_path / "run"

    def argv(r):
        return [PYTHON, "-m", "megaeff.train", *COMMON, "train.micro_batch_size=2", "train.grad_accum=2",
                f"run_dir={run}"]  # fmt: skip

    def env(r):
        return cli_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))  # fmt: skip

    spawn_two(argv, env, tmp_path)
    assert_matches(reference, run)


def test_resume_from_one_rank_onto_two(reference, tmp_path):
    """Steps 1-3 on one process, stop (train.exit_interval), steps 4-6 on two torchrun ranks: the same run."""
    from megaeff.errors import EXIT_PREEMPTED

    run = tmp_path / "run"
    first = subprocess.run(
        [
            PYTHON,
            "-m",
            "megaeff.train",
            *COMMON,
            "train.micro_batch_size=4",
            "train.grad_accum=2",
            "train.exit_interval=3",
            f"run_dir={run}",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert first.returncode == EXIT_PREEMPTED, first.stdout + first.stderr
    second = subprocess.run(
        [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "megaeff.train",
            *COMMON,
            "train.micro_batch_size=4",
            "train.grad_accum=1",
            f"run_dir={run}",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "at step 3 (24 samples consumed)" in second.stdout
    assert_matches(reference, run)
