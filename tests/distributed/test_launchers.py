"""Two gloo ranks started the three ways users start megaeff (torchrun, the deepspeed launcher's `--local_rank`,
srun's SLURM_* variables) reproduce the single-process run: same per-step losses and validation loss, one shared
run directory, Hydra files written once."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from megaeff.errors import EXIT_PREEMPTED
from tests.helpers import PYTHON, REPO, cli_env, records, train

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
    # Rank 0's record of where each optimizer value came from, replayed from the launcher's command line.
    sources = json.loads((run_dir / "optim_sources.json").read_text())
    assert sources["warmup_steps"] == {"value": 1, "source": "user"}
    assert sources["lr"]["source"] == "optim default"


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

    def env(r):  # what srun gives the tasks of step 0 (the ranks read SLURM_STEP_NUM_TASKS, not SLURM_NTASKS)
        return cli_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_STEP_ID="0",
                       SLURM_STEP_NUM_TASKS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip

    spawn_two(argv, env, tmp_path)
    assert_matches(reference, run)


def test_resume_from_one_rank_onto_two(reference, tmp_path):
    """Steps 1-3 on one process, stop (train.exit_interval), steps 4-6 on two torchrun ranks: the same run."""
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


# ---------------------------------------------------------------------------------------------------- the scripts
# launch/*.sh as users run them, with the real launchers: a stop on request ends as exit 75 whatever torchrun or
# deepspeed returned (the ranks' marker, launch/common.sh), and MAX_RESTARTS recovers from a killed rank. 200 steps
# of ~15 ms: long enough to signal or kill a rank mid-run.
LONG = [
    "experiment=smoke",
    "train.steps=200",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.ckpt_interval=25",
    "train.plot=false",
    "optim.warmup_steps=1",
]
LAUNCH = REPO / "launch"


def script_env(**extra):
    # torchrun / deepspeed from this interpreter's environment; no marker inherited from an outer launch script.
    env = cli_env(PATH=f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}", RESTART_DELAY="1", **extra)
    env.pop("MEGAEFF_STOP_MARKER", None)
    return env


def start_script(script, *args, cwd, **env):
    return subprocess.Popen(["bash", str(LAUNCH / script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=script_env(**env), cwd=cwd)  # fmt: skip


def children(pid: int):
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def wait_for_steps(proc, run_dir, n, timeout=120):
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").is_file() and len(records(run_dir)) >= n):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"no step {n} after {timeout} s"
        time.sleep(0.02)


def finish(proc, expect):
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == expect, out[-4000:]
    return out


def stop_step(out: str) -> int:
    return int(re.search(r"checkpoint saved at step (\d+); resume", out).group(1))


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """The uninterrupted run, in one process with the global batch of two ranks."""
    run = tmp_path_factory.mktemp("long") / "run"
    train(run, *LONG, "train.micro_batch_size=4", "train.grad_accum=2")
    return [r["loss"] for r in records(run)]


def assert_same_losses(long_reference, run_dir):
    got = records(run_dir)
    assert [r["step"] for r in got] == list(range(1, 201))  # every step logged once
    # Two gloo ranks vs one process: the same sums in another order; the launchers tests' bound.
    assert [r["loss"] for r in got] == pytest.approx(long_reference, rel=1e-5)


def test_sigterm_to_torchrun_agent_exits_75_and_resumes(long_reference, tmp_path):
    """What a scheduler sends: SIGTERM to torchrun itself. torchrun passes it to the ranks, which save and stop;
    torchrun then reports 1, the script 75. Rerunning the script resumes and ends as the uninterrupted run."""
    run = tmp_path / "run"
    proc = start_script("torchrun_single_node.sh", *LONG, f"run_dir={run}", cwd=tmp_path, NPROC="2")
    wait_for_steps(proc, run, 3)
    (agent,) = children(proc.pid)
    os.kill(agent, signal.SIGTERM)
    out = finish(proc, EXIT_PREEMPTED)
    assert "got signal: 15" in out  # torchrun's own SignalException: without the marker this would be exit 1
    step = stop_step(out)
    assert 3 <= step < 200
    assert (run / "checkpoints" / "latest").read_text().strip().endswith(f"{step:08d}")
    out = finish(start_script("torchrun_single_node.sh", *LONG, f"run_dir={run}", cwd=tmp_path, NPROC="2"), 0)
    assert f"at step {step} " in out
    assert_same_losses(long_reference, run)


def test_max_duration_under_torchrun_exits_75(tmp_path):
    run = tmp_path / "run"
    args = [*LONG, "train.steps=5000", "train.max_duration_minutes=0.02", f"run_dir={run}"]  # stops after 1.2 s
    out = finish(start_script("torchrun_single_node.sh", *args, cwd=tmp_path, NPROC="2"), EXIT_PREEMPTED)
    assert "stop requested (train.max_duration_minutes)" in out
    assert stop_step(out) < 5000


def test_restart_after_a_killed_rank_matches_uninterrupted_run(long_reference, tmp_path):
    """kill -9 of one rank after the step-25 checkpoint: torchrun fails, the script relaunches it with
    train.resume=auto (a fresh torchrun: torchrun's own --max-restarts leaves gloo unable to connect on torch 2.13),
    and the run ends with every step logged once and the uninterrupted losses."""
    run = tmp_path / "run"
    proc = start_script("torchrun_single_node.sh", *LONG, f"run_dir={run}", cwd=tmp_path, NPROC="2", MAX_RESTARTS="1")
    wait_for_steps(proc, run, 30)
    (agent,) = children(proc.pid)
    ranks = children(agent)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    out = finish(proc, 0)
    assert "launcher failed (exit 1); restart 1 of 1 with train.resume=auto" in out
    assert re.search(r"resumed from \S+ at step (25|50|75|100|125|150|175) ", out), out[-3000:]
    assert_same_losses(long_reference, run)


def test_deepspeed_script_on_this_node_stops_with_75(tmp_path):
    """launch/deepspeed.sh without a hostfile runs on this node; launcher options go before `--`. The deepspeed
    launcher reports its own code after the ranks' 75: the marker makes it 75 (resuming is the torchrun tests')."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    args = ["--num_gpus", "2", "--master_port", str(free_port()), "--", *COMMON, "train.micro_batch_size=4",
            "train.exit_interval=3", f"run_dir={run}"]  # fmt: skip
    out = finish(start_script("deepspeed.sh", *args, cwd=tmp_path), EXIT_PREEMPTED)
    assert "--local_rank=1" in out and "dp=2" in out
    assert stop_step(out) == 3 and [r["step"] for r in records(run)] == [1, 2, 3]
