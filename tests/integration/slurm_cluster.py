"""A one-node Slurm cluster in a temporary directory, for tests/integration/test_slurm.py.

It installs nothing: `munged`, `slurmctld` and `slurmd` must be on the machine (Debian: `apt-get install slurm-wlm
munge`, which .ci/run does). The three daemons run in the foreground as children of the test process, with their
own munge key, socket, ports, state and log files under `root`, and are stopped by PID. The configuration is the
one a single-node Slurm needs without cgroups: linuxproc process tracking, no task plugin, cons_tres selection of
CPUs, and the node's CPU count taken from the config (`SlurmdParameters=config_overrides`) rather than the
hardware, so that an 8-CPU node can be declared on a 2-core machine.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
# A requeued job may start again only after its old credentials expire: Slurm's default is 120 s. Ten seconds, and
# a scheduling pass every 2 s (instead of 60, and 30 for backfill) to start it then, keep the preemption test short.
CRED_EXPIRE_S = 10


def missing_daemons() -> List[str]:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in DAEMONS if shutil.which(name, path=search) is None]


def _which(name: str) -> str:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, node: str, cpus: int = 8) -> str:
    ctld_port, slurmd_port = _free_port(), _free_port()
    return f"""\
ClusterName=megaeff-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `run(cmd)` runs a client command (sbatch, scontrol, ...)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.procs: Dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    # ------------------------------------------------------------------------------------------------ daemons
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # munged refuses a key or socket in a directory others may write
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        (self.root / "slurm.conf").write_text(slurm_conf(self.root, self.node))
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={self.root}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={self.root}/munged.pid",
                f"--log-file={self.root}/munged.log",
                f"--seed-file={self.root}/munged.seed",
            ],  # fmt: skip
        )
        self._wait_for(lambda: (self.root / "munge.socket").exists(), timeout, "munged's socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.root / "slurm.conf")])
        self._wait_for(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout, "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.root / "slurm.conf")])
        self._wait_for(self._node_idle, timeout, f"node {self.node} to be idle")
        return self

    def _spawn(self, name: str, argv: List[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}: {self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"waiting for {what}: {self.logs()}")

    def _node_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout
        return out.strip() == "idle"

    def stop(self) -> None:
        """Cancel what is still queued or running (a failed test's job would outlive the daemons), then stop the
        daemons by PID, newest first (slurmd, slurmctld, munged)."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", "--full", *jobs], check=False)
                deadline = time.monotonic() + 60
                while self.run(["squeue", "-h"], check=False).stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    def logs(self) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log", "munged.stdout", "slurmctld.stdout", "slurmd.stdout"):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------------------ clients
    def run(self, argv: List[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        env = dict(self.env, **kw.pop("env", {}))
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, args: List[str], cwd: Path, env: Optional[Dict[str, str]] = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or {}).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is gone."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}

    def wait_state(self, job_id: int, states, timeout: float) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        info: Dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {info}\n{self.logs()}")
