"""The run directory: checked before anything is written into it, and locked for the run's lifetime.

Two runs in one run_dir remove each other's temporary checkpoints, trim each other's metrics and resume each
other's checkpoints. Rank 0 therefore holds an exclusive `fcntl.flock` on `<run_dir>/.lock` for the whole run;
the file names the holder (host, PID, start time), so a second run fails with one message saying who has it. The
kernel drops the lock when the holder exits, however it exits (kill -9 included): a stale `.lock` file never
blocks a new run, and it is left in place (removing it would race with a new holder). flock works on local file
systems and on NFSv4 and Lustre mounted with `flock`; where the file system refuses it the run goes on with a
warning, unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from megaeff.errors import ConfigError, MegaeffError

LOCK_NAME = ".lock"
# flock is unsupported here: go on without the lock (warned) rather than refuse to run.
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def prepare_run_dir(path: Path) -> Path:
    """Create `path` if needed; one ConfigError naming run_dir when it is a file, under a file, or not writable."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError("run_dir", f"{path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file or an unreadable directory on the way, no permission, a read-only mount
        raise ConfigError("run_dir", f"cannot create {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("run_dir", f"{path} is not writable")
    return path


class RunDirLock:
    """`with RunDirLock(run_dir): ...`: an exclusive, non-blocking lock; raises ConfigError if another run holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError("run_dir", f"cannot write {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown (it has not written its name)"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    "run_dir",
                    f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, stop it, or "
                    "choose another run_dir",
                ) from None
            if exc.errno in UNSUPPORTED:
                print(f"megaeff: warning: cannot lock {self.path} ({exc.strerror}); not protected", file=sys.stderr)
                return self
            raise
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# Hydra flags after which no job runs (it prints and exits): nothing to claim.
NO_JOB_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc")


def explicit_run_dir(argv: Iterable[str]) -> Optional[Path]:
    """The run_dir a command line sets to one plain path (the last `run_dir=` wins, as in Hydra); None when it is
    not set, is a sweep, holds an interpolation only Hydra can resolve, or no job will run."""
    value = None
    for arg in argv:
        if arg.split("=", 1)[0] in NO_JOB_FLAGS:
            return None
        key, sep, rest = arg.partition("=")
        if sep and key.lstrip("+~") == "run_dir":
            value = rest
    if not value or "${" in value or "," in value or value.startswith(("glob(", "range(", "choice(")):
        return None
    return Path(value.strip("'\""))


@dataclass
class RunDirClaim:
    """A run directory every rank agreed on; rank 0 holds its lock (`lock` is None on the other ranks)."""

    path: Path
    lock: Optional[RunDirLock] = None

    def covers(self, run_dir: Path) -> bool:
        return self.path.resolve() == Path(run_dir).resolve()

    def __enter__(self) -> "RunDirClaim":
        if self.lock is not None:
            self.lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


def claim_run_dir(path: Path, *, is_main: bool, distributed: bool, held: Optional[RunDirClaim] = None) -> RunDirClaim:
    """Rank 0 checks `path` and takes its lock; every rank learns the outcome (a broadcast when `distributed`), so
    that all raise the same error instead of leaving the others waiting in the first collective. Every rank must
    call it. `held`: a claim taken earlier; rank 0 keeps it when it covers `path` (the other ranks follow)."""
    lock = held.lock if held is not None and held.lock is not None and held.covers(path) else None
    error = None
    if is_main and lock is None:
        try:
            prepare_run_dir(path)
            lock = RunDirLock(path).acquire()
        except MegaeffError as exc:
            error = str(exc)
    if distributed:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise MegaeffError(error if is_main else f"{error} (reported by rank 0)")
    return RunDirClaim(Path(path), lock)
