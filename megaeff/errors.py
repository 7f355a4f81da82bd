"""Errors that end a run with one clear message instead of a traceback.

The CLI catches `MegaeffError`, prints `megaeff: error: <message>` and exits with `EXIT_USAGE`.
"""

EXIT_USAGE = 2
# Exit code after a requested stop (SIGTERM/SIGUSR1 or the wall-time limit) once the checkpoint is saved.
# 75 is EX_TEMPFAIL from sysexits.h: "try again later", which is what a Slurm requeue should do.
EXIT_PREEMPTED = 75


class MegaeffError(Exception):
    """Base class: the message alone must tell the user what to fix."""


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
