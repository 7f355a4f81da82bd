"""The launch scripts' own logic, with stand-ins for torchrun, deepspeed and nvidia-smi on PATH that record their
command line: how many ranks they ask for, the options they pass on, the exit code they report (75 read from the
ranks' stop marker, whatever the launcher returned), restarts and signal forwarding. The real launchers run in
tests/distributed/test_launchers.py and tests/integration/test_slurm.py; the Docker files are checked here too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megaeff.train.signals import STOP_MARKER_ENV, mark_stopped
from tests.helpers import REPO

LAUNCH = REPO / "launch"

# Records each call (arguments one per line, then ---); writes the stop marker when asked (as the ranks do after a
# requested stop's checkpoint), waits when asked, and exits with STUB_RC.
STUB = r"""#!/usr/bin/env bash
{ echo "$(basename "$0")"; printf '%s\n' "$@"; echo ---; } >> "$STUB_LOG"
on_term() {
    echo TERM >> "$STUB_LOG"
    [[ -n "${STUB_MARK_ON_TERM:-}" ]] && echo "step 3 checkpoint ckpt" > "$MEGAEFF_STOP_MARKER"
    kill "$sleeper" 2>/dev/null
    exit 1
}
trap on_term TERM
[[ -n "${STUB_MARK:-}" ]] && echo "step 5 checkpoint ckpt" > "$MEGAEFF_STOP_MARKER"
if [[ -n "${STUB_WAIT:-}" ]]; then
    sleep 30 &
    sleeper=$!
    touch "$STUB_WAIT"
    wait "$sleeper"
fi
exit "${STUB_RC:-0}"
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "deepspeed"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def nvidia_smi(bin_dir: Path, gpus: int, rc: int = 0, message: str = "") -> None:
    lines = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus))
    (bin_dir / "nvidia-smi").write_text(f"#!/usr/bin/env bash\n{lines}echo '{message}'\nexit {rc}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)


def launch(script, *args, stubs: Path, env=None, expect=0, **kw):
    log = stubs.parent / "calls.log"
    log.unlink(missing_ok=True)  # this call's launcher calls only
    full_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC", STOP_MARKER_ENV)}
    full_env.update(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log), RESTART_DELAY="0")
    full_env.update(env or {})
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=full_env,
                          timeout=60, cwd=stubs.parent, **kw)  # fmt: skip
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return calls(log), proc.stderr


def calls(log: Path):
    """[[program, arg, ...], ...], one list per launcher call."""
    if not log.exists():
        return []
    out, cur = [], []
    for line in log.read_text().splitlines():
        if line == "---":
            out.append(cur)
            cur = []
        elif line != "TERM":
            cur.append(line)
    return out


def option(call, name):
    return [a.split("=", 1)[1] for a in call if a.startswith(name + "=")]


# ------------------------------------------------------------------------------------------------ rank counts
@pytest.mark.parametrize(
    "env,gpus,expected",
    [
        ({"NPROC": "3"}, 8, "3"),  # NPROC always wins
        ({}, 8, "8"),  # one per GPU
        ({"CUDA_VISIBLE_DEVICES": "0,2"}, 8, "2"),  # the visible ones, not all of them
        ({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, 8, "1"),  # CUDA stops at the first invalid entry
        ({"CUDA_VISIBLE_DEVICES": ""}, 8, "2"),  # none visible: the CPU default
        ({}, 0, "2"),
    ],
)
def test_single_node_rank_count(stubs, env, gpus, expected):
    nvidia_smi(stubs, gpus)
    (call,), _ = launch("torchrun_single_node.sh", "experiment=smoke", stubs=stubs, env=env)
    assert option(call, "--nproc_per_node") == [expected]
    assert call[-3:] == ["-m", "megaeff.train", "experiment=smoke"]


def test_single_node_survives_a_failing_nvidia_smi(stubs):
    """A driver without a usable GPU: nvidia-smi fails, which under `set -e` used to end the script before NPROC
    was even read."""
    nvidia_smi(stubs, 0, rc=6, message="No devices were found")
    (call,), _ = launch("torchrun_single_node.sh", stubs=stubs)
    assert option(call, "--nproc_per_node") == ["2"]
    (call,), _ = launch("torchrun_single_node.sh", stubs=stubs, env={"NPROC": "4"})
    assert option(call, "--nproc_per_node") == ["4"]


@pytest.mark.parametrize("env,gpus,expected", [({}, 0, "1"), ({}, 4, "4"), ({"NPROC": "2"}, 4, "2")])
def test_multi_node_rank_count(stubs, env, gpus, expected):
    nvidia_smi(stubs, gpus, rc=0 if gpus else 9, message="" if gpus else "couldn't communicate with the driver")
    node = {"MASTER_ADDR": "node0", "NNODES": "2", "NODE_RANK": "1"}
    (call,), _ = launch("torchrun_multi_node.sh", "model=llama_1b", stubs=stubs, env={**node, **env})
    assert option(call, "--nproc_per_node") == [expected]
    assert option(call, "--nnodes") == ["2"] and option(call, "--node_rank") == ["1"]
    assert option(call, "--master_addr") == ["node0"] and option(call, "--master_port") == ["29500"]


def test_torchrun_forwards_slurms_warning_signal(stubs):
    """torchrun's default handled signals lack SIGUSR1, so SIGUSR1 sent to the agent would kill it; and its default
    30 s shutdown grace can be shorter than a large model's save."""
    (call,), _ = launch("torchrun_single_node.sh", stubs=stubs, env={"NPROC": "2"})
    assert "SIGUSR1" in option(call, "--signals-to-handle")[0].split(",")
    assert option(call, "--shutdown-timeout") == ["300"]


# ------------------------------------------------------------------------------------------------ deepspeed
def test_deepspeed_defaults_to_this_node_and_passes_launcher_options(stubs):
    (call,), _ = launch("deepspeed.sh", "experiment=smoke", "run_dir=r", stubs=stubs)
    assert "--hostfile" not in call  # not the example hostfile with its fake hosts
    assert call[-4:] == ["--module", "megaeff.train", "experiment=smoke", "run_dir=r"]
    (call,), _ = launch("deepspeed.sh", "--num_gpus", "2", "--master_port", "1234", "--", "experiment=smoke",
                        stubs=stubs)  # fmt: skip
    i = call.index("--num_gpus")
    assert call[i + 1] == "2" and call.index("--module") > i
    assert call[call.index("--master_port", i) + 1] == "1234"  # the user's port comes last, so argparse takes it
    assert call[-3:] == ["--module", "megaeff.train", "experiment=smoke"]
    (call,), _ = launch("deepspeed.sh", "model=llama_1b", stubs=stubs, env={"HOSTFILE": "launch/hostfile.example"})
    assert call[call.index("--hostfile") + 1] == "launch/hostfile.example"


# ------------------------------------------------------------------------------------------------ exit codes
@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "deepspeed.sh"])
def test_stop_marker_makes_exit_75_whatever_the_launcher_returns(stubs, script):
    launch(script, stubs=stubs, env={"STUB_MARK": "1", "STUB_RC": "1"}, expect=75)  # torchrun's ChildFailedError
    launch(script, stubs=stubs, env={"STUB_MARK": "1", "STUB_RC": "0"}, expect=75)
    launch(script, stubs=stubs, env={"STUB_RC": "1"}, expect=1)  # a failure stays a failure
    launch(script, stubs=stubs, env={"STUB_RC": "0"}, expect=0)
    assert list(stubs.parent.glob("megaeff-launch.*")) == []  # the marker's temporary directory is removed


def test_restarts_relaunch_from_the_latest_checkpoint_in_one_run_dir(stubs):
    runs, err = launch("torchrun_single_node.sh", "experiment=smoke", "train.resume=none", stubs=stubs,
                       env={"STUB_RC": "1", "MAX_RESTARTS": "2", "NPROC": "2"}, expect=1)  # fmt: skip
    assert len(runs) == 3, err  # the first attempt and two restarts, then the failure is reported
    run_dirs = [option(c, "run_dir") for c in runs]
    assert run_dirs[0] == run_dirs[1] == run_dirs[2] and len(run_dirs[0]) == 1  # chosen once, passed to every attempt
    assert runs[0][-1] != "train.resume=auto" and runs[1][-1] == runs[2][-1] == "train.resume=auto"
    assert runs[2].count("train.resume=auto") == 1
    assert "restart 2 of 2" in err
    runs, _ = launch("torchrun_single_node.sh", "run_dir=mine", stubs=stubs,
                     env={"STUB_RC": "1", "MAX_RESTARTS": "1"}, expect=1)  # fmt: skip
    assert [option(c, "run_dir") for c in runs] == [["mine"], ["mine"]]
    runs, _ = launch("torchrun_single_node.sh", stubs=stubs, env={"STUB_RC": "0", "MAX_RESTARTS": "3"})
    assert len(runs) == 1  # a finished run is not restarted
    stopped = {"STUB_MARK": "1", "STUB_RC": "1", "MAX_RESTARTS": "3"}
    runs, _ = launch("torchrun_single_node.sh", stubs=stubs, env=stopped, expect=75)
    assert len(runs) == 1  # nor one stopped on request: the scheduler requeues it


def start_and_signal(stubs, sig, env):
    log, ready = stubs.parent / "calls.log", stubs.parent / "ready"
    full_env = {k: v for k, v in os.environ.items() if k != STOP_MARKER_ENV}
    full_env.update(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log), STUB_WAIT=str(ready),
                    RESTART_DELAY="0", NPROC="2", **env)  # fmt: skip
    proc = subprocess.Popen(["bash", str(LAUNCH / "torchrun_single_node.sh")], env=full_env, cwd=stubs.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(sig)
    out = proc.communicate(timeout=30)[0]
    return proc.returncode, log.read_text(), out


def test_signal_to_the_script_reaches_the_launcher(stubs):
    """A container stop or `kill <script>` signals the script, not torchrun: it passes the signal on."""
    rc, log, out = start_and_signal(stubs, signal.SIGTERM, {"STUB_MARK_ON_TERM": "1"})
    assert "TERM" in log.splitlines()
    assert rc == 75, out


def test_no_restart_after_a_signal(stubs):
    rc, log, out = start_and_signal(stubs, signal.SIGTERM, {"MAX_RESTARTS": "3"})
    assert rc == 1, out  # stopped without a checkpoint: the launcher's failure, and no relaunch
    assert log.count("---") == 1


# ------------------------------------------------------------------------------------------------ marker (rank side)
def test_mark_stopped_writes_only_where_the_script_asked(tmp_path):
    target = tmp_path / "stopped"
    assert mark_stopped(7, "ckpt/step_7", env={}) is None
    assert mark_stopped(7, "ckpt/step_7", env={STOP_MARKER_ENV: str(tmp_path / "other-node" / "stopped")}) is None
    assert not (tmp_path / "other-node").exists()  # no directory made on a node whose script did not ask
    assert mark_stopped(7, "ckpt/step_7", env={STOP_MARKER_ENV: str(target)}) == target
    assert target.read_text() == "step 7 checkpoint ckpt/step_7\n"
    assert [p.name for p in tmp_path.iterdir()] == ["stopped"]  # written atomically: no temporary file left


# ------------------------------------------------------------------------------------------------ Slurm script
def test_sbatch_header():
    text = (LAUNCH / "slurm" / "train.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, re.M))
    # Warning signal to the tasks (the ranks), not `B:` (the batch shell only, which dies without a requeue).
    assert directives["signal"] == "USR1@300" and "requeue" in directives
    # Slurm opens the output before the script runs: no directory that may not exist.
    assert "/" not in directives["output"]
    # The CPU overrides are documented in the header.
    assert "sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 launch/slurm/train.sbatch" in text
    import megaeff.train.signals as signals

    assert "--signal=USR1@300" in signals.__doc__ and "--signal=B:USR1" not in signals.__doc__


# ------------------------------------------------------------------------------------------------ Docker
def test_docker_files():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    run_lines = " ".join(re.findall(r"^RUN .*(?:\n(?!\S).*)*", dockerfile, re.M))
    assert "||" not in run_lines  # a failed install must fail the build
    version = (REPO / "docker" / "NGC_VERSION").read_text().strip()
    assert f"ARG NGC_VERSION={version}" in dockerfile  # the default build arg is the file's version
    assert re.search(r"^FROM \S+:\$\{NGC_VERSION\}", dockerfile, re.M)
    assert "docker/install.sh" in run_lines  # the steps .ci/run runs in a fresh venv
    for script in ("docker/install.sh", "launch/common.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", "logs/", "multirun/", "runs/"} <= set(ignored)
    # The apex remark matches what the image does: NGC's base image ships apex; nothing builds it.
    assert "apex" not in dockerfile.lower() or "base image" in dockerfile.lower()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "apex is built" not in pyproject and "apex is built" not in (REPO / "setup.py").read_text()
