"""Cooperative stop: SIGTERM / SIGUSR1 only set a flag; the trainer checks it at each step boundary, agrees on it
across ranks, saves a checkpoint and exits with `EXIT_PREEMPTED`. Slurm sends one of these before a time limit
or preemption (`#SBATCH --signal=B:USR1@300`), and the batch script requeues on that exit code."""

from __future__ import annotations

import signal
from typing import Dict, Optional

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def install(self, signals=DEFAULT_SIGNALS) -> "StopRequest":
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
