"""Cooperative stop: SIGTERM / SIGUSR1 only set a flag; the trainer checks it at each step boundary, agrees on it
across ranks, saves a checkpoint and exits with `EXIT_PREEMPTED`. Slurm sends one of these to every task of the
job's steps before a time limit or preemption (`#SBATCH --signal=USR1@300`, as launch/slurm/train.sbatch has it:
the `B:` form would signal only the batch shell, which dies of it and never requeues).

A launcher between the ranks and the scheduler (torchrun, deepspeed, srun) reports its own exit code, not the
ranks' 75, so after the checkpoint is saved every rank also writes the file named by `MEGAEFF_STOP_MARKER`
(`mark_stopped`); the scripts in launch/ set that variable and exit 75 when the file exists."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from megaeff.config.train import TrainConfig
from megaeff.distributed.comm import all_reduce_scalar
from megaeff.distributed.dims import ParallelDims

# The launch scripts (launch/common.sh) export this path; a rank writes it only after a requested stop's checkpoint
# is complete on every rank.
STOP_MARKER_ENV = "MEGAEFF_STOP_MARKER"

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


def mark_stopped(step: int, checkpoint, env: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """Tell the launch script that this run saved `checkpoint` at `step` and stopped on request: write the file
    named by $MEGAEFF_STOP_MARKER. Every rank writes it (atomically, the same text), so that the script on each
    node of a multi-node torchrun job sees its own ranks' marker; a rank whose node has no such directory (srun
    ranks on the nodes other than the batch host) writes nothing. Returns the path written, or None."""
    env = os.environ if env is None else env
    target = env.get(STOP_MARKER_ENV)
    if not target:
        return None
    path = Path(target)
    if not path.parent.is_dir():
        return None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"step {step} checkpoint {checkpoint}\n")
        os.replace(tmp, path)
    except OSError as exc:  # the checkpoint is saved; only the exit code the script reports is at stake
        print(f"megaeff: warning: could not write the stop marker {path}: {exc}", file=sys.stderr, flush=True)
        return None
    return path


def agreed_stop_reason(
    stop: StopRequest, tcfg: TrainConfig, step: int, started: float, dims: ParallelDims, device: torch.device
) -> Optional[str]:
    """Why the run stops after `step` (None: it goes on), the same answer on every rank: `train.exit_interval`,
    a signal, or `train.max_duration_minutes` (measured from the monotonic time `started`)."""
    if tcfg.exit_interval and step % tcfg.exit_interval == 0:
        return f"train.exit_interval={tcfg.exit_interval}"  # the same step on every rank: no agreement needed
    limit = tcfg.max_duration_minutes
    timed_out = limit is not None and time.monotonic() - started > 60.0 * limit
    # 2: a signal, 1: the wall-time budget, 0: go on. Any rank's reason stops every rank at the same step (a
    # collective, so no rank is left waiting), and every rank names the strongest reason any rank had.
    code = 2 if stop.requested else int(timed_out)
    if dims.world_size > 1:
        world = dims.group("world")
        code = int(
            all_reduce_scalar(float(code), world, "world", dims.comm_stats, device, op=torch.distributed.ReduceOp.MAX)
        )
    if code == 0:
        return None
    if code == 1:
        return "train.max_duration_minutes"
    return f"signal {stop.signum}" if stop.requested else "a signal to another rank"
