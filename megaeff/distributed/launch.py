"""Where this process sits in the job, read from whichever launcher started it.

torchrun and the `deepspeed` launcher export RANK / WORLD_SIZE / LOCAL_RANK (deepspeed also passes
`--local_rank=N` on the command line, which the CLI strips). Under `srun` without torchrun only the SLURM_*
variables exist; they are mapped onto the same three numbers. Only the tasks of an srun step count as ranks:
the batch script of an `sbatch --ntasks=N` job (and whatever it runs without srun) also sees SLURM_PROCID and
SLURM_NTASKS=N, but no SLURM_STEP_ID / SLURM_STEP_NUM_TASKS, and is one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # single | torchrun | slurm
    step: str = ""  # the srun step id under Slurm

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        where = f"srun step {self.step}" if self.launcher == "slurm" else self.launcher
        return f"launched by {where}: {self.world_size} ranks"


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as exc:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from exc


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            "torchrun",
        )
    if "SLURM_STEP_ID" in env and "SLURM_STEP_NUM_TASKS" in env and _int(env, "SLURM_STEP_NUM_TASKS") > 1:
        return LaunchEnv(
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_STEP_NUM_TASKS"),
            _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            "slurm",
            env["SLURM_STEP_ID"],
        )
    return LaunchEnv(0, 1, 0, "single")


def local_world_size(env: Optional[Mapping[str, str]] = None) -> int:
    """Processes the launcher started on this node (torchrun's LOCAL_WORLD_SIZE); 0 when it does not say."""
    env = os.environ if env is None else env
    return _int(env, "LOCAL_WORLD_SIZE") if env.get("LOCAL_WORLD_SIZE") else 0


def export_slurm_env(launch: LaunchEnv, env=None) -> None:
    """torch's env:// rendezvous reads RANK/WORLD_SIZE/MASTER_*; fill them in for a plain `srun` launch."""
    env = os.environ if env is None else env
    if launch.launcher != "slurm":
        return
    env.setdefault("RANK", str(launch.rank))
    env.setdefault("WORLD_SIZE", str(launch.world_size))
    env.setdefault("LOCAL_RANK", str(launch.local_rank))
    if "MASTER_ADDR" not in env:
        raise ValueError(
            "launched by srun without torchrun: export MASTER_ADDR (the first host of the job) and MASTER_PORT; "
            "launch/slurm/train.sbatch shows how"
        )
    env.setdefault("MASTER_PORT", "29500")


def strip_launcher_args(argv: List[str]) -> Tuple[List[str], Optional[int]]:
    """Remove `--local_rank=N` / `--local_rank N` / `--local-rank=N` (deepspeed, torch.distributed.launch)."""
    out: List[str] = []
    local_rank: Optional[int] = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        for flag in ("--local_rank", "--local-rank"):
            if arg == flag and i + 1 < len(argv):
                local_rank = int(argv[i + 1])
                i += 2
                break
            if arg.startswith(flag + "="):
                local_rank = int(arg.split("=", 1)[1])
                i += 1
                break
        else:
            out.append(arg)
            i += 1
    return out, local_rank
