"""The few object collectives a checkpoint needs (on its own gloo group), and agreement on failures: when one rank
cannot go on, every rank raises the same error instead of the others waiting in the next collective."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch.distributed as dist

from megaeff.errors import CheckpointError, DiskFullError, MegaeffError
from megaeff.train.checkpoint.files import raise_if_disk_full

Problem = Optional[Tuple[str, str, str]]  # (kind: "disk" | "checkpoint" | "error", path, message)


def checkpoint_group(world_size: int):
    """A gloo process group of all ranks for checkpoint traffic (collective: every rank calls it, in the same
    order). The asynchronous save runs its collectives on it from a background thread, beside the training
    collectives; gloo carries DCP's object collectives whatever the training backend."""
    if world_size <= 1 or not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo")


def all_gather_obj(obj: Any, world_size: int, group=None) -> List[Any]:
    if world_size <= 1 or not dist.is_initialized():
        return [obj]
    out: List[Any] = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(world_size: int, group=None) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.barrier(group=group)


def problem_of(exc: BaseException) -> Problem:
    if isinstance(exc, DiskFullError):
        return ("disk", exc.path, str(exc))
    if isinstance(exc, CheckpointError):
        return ("checkpoint", exc.path, str(exc).split("': ", 1)[-1])
    return ("error", "", f"{type(exc).__name__}: {exc}")


def raise_problem(problem: Tuple[str, str, str], rank: int, default_path) -> None:
    kind, path, message = problem
    if kind == "disk":
        raise DiskFullError(path)
    if kind == "checkpoint":
        raise CheckpointError(path, message)
    raise CheckpointError(default_path, f"rank {rank}: {message}")


def agree(fn: Callable[[], Any], *, world_size: int, group, path, cleanup: Optional[Callable[[], None]] = None):
    """Run `fn` on every rank; if it fails on any (a megaeff error or an OSError), run `cleanup` and raise the
    first failing rank's error on every rank."""
    result, problem = None, None
    try:
        result = fn()
    except (MegaeffError, OSError) as exc:
        try:
            raise_if_disk_full(exc, path)
            problem = problem_of(exc)
        except DiskFullError as full:
            problem = problem_of(full)
    problems = all_gather_obj(problem, world_size, group)
    failed = [(r, p) for r, p in enumerate(problems) if p is not None]
    if failed:
        if cleanup is not None:
            cleanup()
        raise_problem(failed[0][1], failed[0][0], path)
    return result
