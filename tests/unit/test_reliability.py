"""Reliability parts in one process (issue 18): the non-finite policy, the finite-state check before a save, the
run-directory lock and checks, the hang watchdog, the sample-index cache key."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megaeff.data.gpt_dataset import GPTDataset, SampleOptions
from megaeff.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megaeff.distributed.dims import ParallelDims
from megaeff.errors import EXIT_HUNG, ConfigError, NonFiniteError
from megaeff.train.nonfinite import NonFiniteGuard, check_state_finite
from megaeff.train.run_dir import RunDirLock, explicit_run_dir, prepare_run_dir
from tests.helpers import cli_env


# ----------------------------------------------------------------------------- non-finite policy (item 1)
@pytest.mark.parametrize("loss,norm", [(math.nan, 1.0), (1.0, math.inf), (math.inf, math.nan)])
def test_stop_raises_naming_the_step(loss, norm):
    with pytest.raises(NonFiniteError, match="step 7: non-finite") as exc:
        NonFiniteGuard("stop", 5).admit(7, loss, norm)
    assert exc.value.exit_code == 65


def test_skip_counts_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard("skip", 3)
    assert guard.admit(1, 2.0, 1.0)
    assert not guard.admit(2, math.nan, 1.0) and not guard.admit(3, 2.0, math.inf)
    assert guard.admit(4, 2.0, 1.0)  # a finite step resets the run of skips, not the count
    assert (guard.skipped, guard.consecutive) == (2, 0)
    assert not guard.admit(5, math.nan, math.nan) and not guard.admit(6, math.nan, math.nan)
    with pytest.raises(NonFiniteError, match="step 7: .* 3 steps in a row"):
        guard.admit(7, math.nan, math.nan)
    assert guard.skipped == 5


def test_state_check_sees_parameters_and_optimizer_state():
    dims = ParallelDims(tp=1, cp=1, dp=1, pp=1, world_size=1, rank=0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    check_state_finite(model, opt, dims, 1)  # finite: no error
    opt.state[model.bias]["exp_avg_sq"][0] = math.inf
    with pytest.raises(NonFiniteError, match="step 1: .*'exp_avg_sq' of bias"):
        check_state_finite(model, opt, dims, 1)
    opt.state[model.bias]["exp_avg_sq"][0] = 0.0
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="weight"):
        check_state_finite(model, opt, dims, 1)


# ----------------------------------------------------------------------------- run directory (item 6, tracebacks)
def test_run_dir_that_is_a_file_or_under_one(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        prepare_run_dir(f)
    with pytest.raises(ConfigError, match="cannot create .*Not a directory"):
        prepare_run_dir(f / "run")
    assert prepare_run_dir(tmp_path / "a/b").is_dir()


READ_ONLY = textwrap.dedent(
    """
    import sys
    from megaeff.train.run_dir import prepare_run_dir
    for path in sys.argv[1:]:
        try:
            prepare_run_dir(path)
        except Exception as exc:
            print(type(exc).__name__, exc)
    """
)


def test_read_only_run_dir():
    """A run_dir that is, or lies under, a directory the user cannot write: one ConfigError naming run_dir. Root
    writes anywhere, so as root the check runs as `nobody` under the system Python (megaeff.train.run_dir needs
    only the standard library)."""
    base = Path(tempfile.mkdtemp(prefix="megaeff-ro-", dir="/tmp"))  # pytest's tmp_path is private to its user
    base.chmod(0o755)
    ro = base / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    python, preexec = sys.executable, None
    if os.geteuid() == 0:
        python = shutil.which("python3", path="/usr/bin:/bin")
        if python is None:
            pytest.skip("no system python3 to run as an unprivileged user")

        def preexec():
            os.setgid(65534)
            os.setuid(65534)

    proc = subprocess.run(
        [python, "-c", READ_ONLY, str(ro), str(ro / "run")],
        capture_output=True,
        text=True,
        env=dict(cli_env(), PYTHONPATH=str(Path(__file__).resolve().parents[2])),
        preexec_fn=preexec,
        timeout=60,
    )
    shutil.rmtree(base)
    assert proc.stdout.splitlines() == [
        f"ConfigError config field 'run_dir': {ro} is not writable",
        f"ConfigError config field 'run_dir': cannot create {ro / 'run'}: Permission denied",
    ], proc.stdout + proc.stderr


def test_explicit_run_dir_from_the_command_line():
    assert explicit_run_dir(["experiment=smoke", "run_dir=/x/a", "run_dir=/x/b"]) == Path("/x/b")
    for argv in (["experiment=smoke"], ["run_dir=/x/${name}"], ["run_dir=/x/a,/x/b", "-m"], ["run_dir=/x", "--cfg"]):
        assert explicit_run_dir(argv) is None, argv


HOLDER = textwrap.dedent(
    """
    import sys, time
    from megaeff.train.run_dir import RunDirLock
    lock = RunDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_a_second_holder_is_refused_naming_host_and_pid(tmp_path):
    """Two processes: the second fails at once, naming the first's host and PID; the kernel releases the lock when
    the holder dies (kill -9), and the next run takes it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=cli_env()
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as exc:
            RunDirLock(tmp_path).acquire()
        assert f"host {socket.gethostname()}, pid {holder.pid}" in str(exc.value) and "in use" in str(exc.value)
    finally:
        holder.kill()
        holder.wait()
    with RunDirLock(tmp_path) as lock:
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
        with pytest.raises(ConfigError):  # a second description in this process conflicts too
            RunDirLock(tmp_path).acquire()
        lock.acquire()  # re-entrant on the same object
    RunDirLock(tmp_path).acquire().release()  # released on exit from the with


# ----------------------------------------------------------------------------- hang watchdog (item 8)
STALLED = textwrap.dedent(
    """
    import sys, time
    from megaeff.train.watchdog import HangWatchdog
    with HangWatchdog(0.5, sys.argv[1], 3) as wd:
        wd.beat("step 1")
        time.sleep(30)  # the 'hang'
    """
)


def test_watchdog_dumps_stacks_and_exits_with_its_code(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", STALLED, str(tmp_path)], capture_output=True, text=True, env=cli_env(), timeout=60
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == EXIT_HUNG, proc.stderr
    assert elapsed < 20  # the sleep was 30 s: the watchdog ended it (0.5 s + interpreter start)
    report = (tmp_path / "hang_rank3.txt").read_text()
    assert "no progress" in report and "last completed: step 1" in report
    assert "in <module>" in report and "Thread" in report  # faulthandler's dump of every thread
    assert "megaeff: error: rank 3: no step completed" in proc.stderr


def test_watchdog_stays_quiet_while_beating(tmp_path):
    from megaeff.train.watchdog import HangWatchdog

    with HangWatchdog(0.3, tmp_path, 0) as wd:
        for _ in range(10):
            time.sleep(0.1)
            wd.beat()
    time.sleep(0.5)  # stopped: no report after the block either
    assert not (tmp_path / "hang_rank0.txt").exists()


# ----------------------------------------------------------------------------- sample-index cache key (item 7)
def _write(prefix, docs):
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_document(np.asarray(d))
    b.finalize(str(prefix) + ".idx")
    return IndexedDataset(str(prefix))


def _gpt(ds, cache):
    return GPTDataset(ds, np.arange(len(ds)), 40, 3, SampleOptions(8, 0), name="t", cache_dir=cache)


def test_reordered_documents_rebuild_the_sample_index(tmp_path):
    """Re-preprocessing a prefix with the same documents in another order keeps the document and token counts
    the old cache key used; the stale offsets then pointed past short documents (IndexError) or silently read
    other tokens. Keyed on the .idx content, the cache is rebuilt and equals a cold build."""
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 500, size=n), 0) for n in (3, 40, 5, 31, 2, 60, 4, 25)]
    first = _gpt(_write(tmp_path / "ds", docs), tmp_path / "cache")
    [first.tokens(i) for i in range(len(first))]
    reordered = _write(tmp_path / "ds", docs[::-1])  # same prefix, same counts, other order
    warm = _gpt(reordered, tmp_path / "cache")
    cold = _gpt(_write(tmp_path / "fresh", docs[::-1]), tmp_path / "cold-cache")
    for i in range(len(warm)):
        assert np.array_equal(warm.tokens(i), cold.tokens(i))
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(warm, name), getattr(cold, name)), name
    assert warm.description["idx_sha256"] != first.description["idx_sha256"]
