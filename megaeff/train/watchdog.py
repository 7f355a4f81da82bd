"""The hang watchdog (`train.hang_timeout_s`): a rank that makes no progress dumps its stacks and exits.

A rank stuck in a collective whose peer died or stopped (SIGSTOP, a dead node, a NCCL deadlock) would otherwise
wait for the collective timeout (`train.collective_timeout_s`, 30 minutes by default) and, on NCCL, die without
saying where. A daemon thread watches the time since the trainer last reported progress (a completed step or
evaluation batch, the start of a checkpoint); `megaeff-train` runs `Trainer.fit` inside it (`with
trainer.watchdog:`). When the time exceeds the limit, it writes every thread's Python stack
(`faulthandler`) to `<run_dir>/hang_rank<r>.txt` and ends the process with `EXIT_HUNG` through `os._exit`: the
main thread may be blocked inside C++ and would never see an exception. Every rank runs its own watchdog, so
every rank that is still alive reports, and a scheduler or launch script can restart the job on the code.

Collectives release the GIL while they wait (c10d's bindings do), so the thread runs while the main thread hangs.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from megaeff.errors import EXIT_HUNG


def hang_report_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"hang_rank{rank}.txt"


class HangWatchdog:
    """`with HangWatchdog(timeout_s, run_dir, rank) as wd: ... wd.beat() ...`; a timeout of None disables it."""

    def __init__(self, timeout_s: Optional[float], run_dir: Path, rank: int):
        self.timeout_s = timeout_s
        self.run_dir = Path(run_dir)
        self.rank = rank
        self._last = time.monotonic()
        self._what = "start of training"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self, what: str = "") -> None:
        """Progress: restart the clock. `what` names the last thing completed, for the report."""
        self._last = time.monotonic()
        if what:
            self._what = what

    def start(self) -> "HangWatchdog":
        if self.timeout_s is None or self._thread is not None:
            return self
        self.beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="megaeff-hang-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "HangWatchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _watch(self) -> None:
        poll = min(max(self.timeout_s / 20, 0.05), 5.0)  # fires at most 5% (or 5 s) late
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        path = hang_report_path(self.run_dir, self.rank)
        header = (
            f"megaeff hang watchdog: rank {self.rank} (pid {os.getpid()}) made no progress for {idle:.1f} s "
            f"(train.hang_timeout_s={self.timeout_s}); last completed: {self._what}\n\n"
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(header)
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            where = f"stacks in {path}"
        except OSError as exc:  # an unwritable run_dir must not keep the process alive: stacks go to stderr
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            where = f"stacks on stderr ({path}: {exc.strerror})"
        print(
            f"megaeff: error: rank {self.rank}: no step completed within train.hang_timeout_s={self.timeout_s} s "
            f"(last completed: {self._what}); {where}; exiting with code {EXIT_HUNG}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_HUNG)
