"""launch/slurm/train.sbatch on a real one-node Slurm (tests/integration/slurm_cluster.py), submitted for CPU the way
its header says: the ranks run as the tasks of an srun step, and a job preempted with Slurm's warning signal saves,
exits 75, requeues itself, resumes and finishes with every step logged once and the losses of an uninterrupted job.

The daemons are not installed here: without `munged`, `slurmctld` and `slurmd` the module is skipped, unless
MEGAEFF_REQUIRE_SLURM=1 (set by .ci/run, which installs them) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers import PYTHON, REPO
from tests.integration.slurm_cluster import SlurmCluster, missing_daemons

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
# The header's CPU overrides: 2 ranks of one CPU each instead of 8 GPUs and 64 CPUs.
CPU = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
# Long enough (300 steps of ~15 ms) that the preemption lands mid-run; a checkpoint every 100 steps and at the stop.
RUN = ["experiment=smoke", "train.steps=300", "train.log_interval=1", "train.eval_interval=100",
       "train.ckpt_interval=100", "train.plot=false", "optim.warmup_steps=10"]  # fmt: skip


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_daemons()
    why = ""
    if missing:
        why = f"Slurm daemons not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    elif os.geteuid() != 0:
        why = "the test cluster runs its daemons as root (SlurmUser=root, slurmd starts the tasks)"
    if why and os.environ.get("MEGAEFF_REQUIRE_SLURM") == "1":
        pytest.fail(f"MEGAEFF_REQUIRE_SLURM=1 but {why}")
    if why:
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def submit(slurm, workdir: Path, run_dir: Path) -> int:
    # The ranks run `python -m megaeff.train` from PATH: this test's interpreter first.
    env = {"PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    return slurm.sbatch([*CPU, str(SBATCH), *RUN, f"run_dir={run_dir}"], cwd=workdir, env=env)


def train_records(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def output(workdir: Path, job: int) -> str:
    return (workdir / f"megaeff-{job}.out").read_text()


def test_sbatch_cpu_runs_ranks_under_srun_then_preempted_job_requeues_and_matches(slurm, tmp_path):
    # 1. The uninterrupted job.
    ref_dir = tmp_path / "ref"
    job = submit(slurm, tmp_path, ref_dir)
    info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 180)
    log = output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert "megaeff: launched by srun step 0: 2 ranks" in log  # read from SLURM_STEP_ID / SLURM_STEP_NUM_TASKS
    assert "layout: tp=1 cp=1 dp=2 pp=1 on cpu" in log
    assert "final: step 300" in log
    ref = train_records(ref_dir)
    assert [r["step"] for r in ref] == list(range(1, 301))

    # 2. The same job, preempted with Slurm's warning signal a few steps in.
    run_dir = tmp_path / "preempted"
    job = submit(slurm, tmp_path, run_dir)
    deadline = time.monotonic() + 120
    while len(train_records(run_dir)) < 3:
        assert time.monotonic() < deadline, slurm.job(job)
        time.sleep(0.05)
    slurm.run(["scancel", "-s", "USR1", str(job)])
    # The script requeues the job (Restarts=1); Slurm starts it again once the old credentials expire.
    info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 240)
    log = output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", info
    assert "stop requested (signal 10)" in log  # SIGUSR1 reached the ranks
    assert f"stopped on request with a checkpoint saved: requeueing job {job}" in log
    stopped = int(log.split("stop requested (signal 10): checkpoint saved at step ")[1].split(";")[0])
    assert 3 <= stopped < 300
    assert f"at step {stopped} " in log  # the requeued run resumed from the checkpoint of the stop
    assert "megaeff: job %d (restart 1)" % job in log
    got = train_records(run_dir)
    assert [r["step"] for r in got] == list(range(1, 301))  # every step once
    # fp32 on CPU, same layout and seeds: a resumed run repeats the uninterrupted one bit for bit.
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
