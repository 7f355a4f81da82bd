"""Errors that end a run with one clear message instead of a traceback.

The CLI catches `MegaeffError`, prints `megaeff: error: <message>` and exits with the error's `exit_code`
(`EXIT_USAGE` unless a subclass says otherwise).
"""

EXIT_USAGE = 2
# Exit code after a requested stop (SIGTERM/SIGUSR1 or the wall-time limit) once the checkpoint is saved.
# 75 is EX_TEMPFAIL from sysexits.h: "try again later", which is what a Slurm requeue should do.
EXIT_PREEMPTED = 75
# A write failed because the disk (or quota) is full: 74 is EX_IOERR from sysexits.h. Nothing was lost (the
# previous checkpoint and `latest` are intact); free space and rerun.
EXIT_DISK_FULL = 74
# The loss or the gradient norm stopped being finite (train.nonfinite): 65 is EX_DATAERR from sysexits.h. No
# checkpoint was written from the bad state; a plain requeue would repeat it, so this is not 75.
EXIT_NONFINITE = 65
# The hang watchdog fired (train.hang_timeout_s): no step completed in time, every rank that could dumped its
# Python stacks to <run_dir>/hang_rank<r>.txt. 69 is EX_UNAVAILABLE: a rank or the network stopped answering;
# restart the job (train.resume=auto continues from the last checkpoint).
EXIT_HUNG = 69


class MegaeffError(Exception):
    """Base class: the message alone must tell the user what to fix."""

    exit_code = EXIT_USAGE


class ConfigError(MegaeffError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field '{field}': {message}")


class CheckpointError(MegaeffError):
    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"checkpoint '{path}': {message}")


class DataError(MegaeffError):
    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"data '{path}': {message}")


class DiskFullError(MegaeffError):
    exit_code = EXIT_DISK_FULL

    def __init__(self, path):
        self.path = str(path)
        super().__init__(f"no space left on device while writing {path}")


class NonFiniteError(MegaeffError):
    """The loss or gradient norm is NaN/inf (train.nonfinite=stop, or too many skips in a row)."""

    exit_code = EXIT_NONFINITE
