"""Hydra multirun (`-m`): every job of a sweep trains in its own run directory, `<run_dir>/<job number>` with its
own `.hydra/`, under torchrun (the launch script, jobs one after another) and with a parallel Hydra launcher
(joblib, jobs at the same time). A 2-LR sweep gives two different results, each equal to the single run with that
LR; with a shared run_dir the second job resumed the first one's final checkpoint and reported its result."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import PYTHON, REPO, cli_env, records, train

pytestmark = pytest.mark.slow

LRS = ("1e-3", "3e-3")
COMMON = ["experiment=smoke", "train.plot=false", "train.log_interval=1"]
ONE_PROCESS = ["train.micro_batch_size=4", "train.grad_accum=2"]  # the global batch of two ranks of 4


def losses(run_dir: Path):
    return [r["loss"] for r in records(run_dir)], [r["val_loss"] for r in records(run_dir, "eval")]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single run for each LR, in one process."""
    out = {}
    for lr in LRS:
        run = tmp_path_factory.mktemp(f"lr{lr}") / "run"
        train(run, *COMMON, *ONE_PROCESS, f"optim.lr={lr}")
        out[lr] = losses(run)
    assert out[LRS[0]] != out[LRS[1]]
    return out


def check_sweep(sweep_dir: Path, single, rel):
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["0", "1"], jobs
    for job, lr in zip(jobs, LRS):
        run = sweep_dir / job
        assert OmegaConf.load(run / ".hydra" / "config.yaml").optim.lr == float(lr)  # the job's own .hydra/
        train_losses, val_losses = losses(run)
        assert len(train_losses) == 8  # trained all its steps: nothing resumed from the other job
        ref_train, ref_val = single[lr]
        assert train_losses == pytest.approx(ref_train, rel=rel)
        assert val_losses == pytest.approx(ref_val, rel=rel)
    assert losses(sweep_dir / "0") != losses(sweep_dir / "1")


def test_sweep_under_torchrun_script(single, tmp_path):
    sweep = tmp_path / "sweep"
    env = cli_env(PATH=f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}", NPROC="2")
    env.pop("MEGAEFF_STOP_MARKER", None)
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "launch" / "torchrun_single_node.sh"),
            "-m",
            f"optim.lr={','.join(LRS)}",
            *COMMON,
            "train.micro_batch_size=4",
            f"run_dir={sweep}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Two gloo ranks vs one process: the same sums in another order (tests/distributed/test_launchers.py's bound).
    check_sweep(sweep, single, rel=1e-5)


def test_sweep_with_parallel_joblib_launcher(single, tmp_path):
    """No run_dir given: both jobs start in the same second, so the default runs/<timestamp> is shared by the
    sweep, and the job number keeps them apart."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "megaeff.train",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"optim.lr={','.join(LRS)}",
            *COMMON,
            *ONE_PROCESS,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (tmp_path / "runs").iterdir()
    assert (sweep / "multirun.yaml").is_file()
    check_sweep(sweep, single, rel=0)  # the same process configuration: bit for bit
