"""ParallelDims: parallel degrees -> rank coordinates and process groups.

Rank order follows Megatron: tp innermost, then cp, then dp, pp outermost, so that the most
communication-hungry axis (tp) stays within a node. The object is passed explicitly to every component that
needs it; nothing reads parallel state from module globals.

This version builds the data-parallel group; the tensor, context and pipeline axes are validated here and
get their groups when their own modules land.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megaeff.distributed.comm import CommStats
from megaeff.errors import ConfigError

AXES = ("tp", "cp", "dp", "pp")  # innermost first
IMPLEMENTED_AXES = ("dp",)


@dataclass
class ParallelDims:
    tp: int
    cp: int
    dp: int
    pp: int
    world_size: int
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    groups: Dict[str, Optional[object]] = field(default_factory=dict)
    comm_stats: CommStats = field(default_factory=CommStats)

    @classmethod
    def from_config(cls, pcfg, world_size: int, rank: int = 0, device: Optional[torch.device] = None) -> "ParallelDims":
        degrees = {axis: int(getattr(pcfg, axis)) for axis in AXES}
        wild = [a for a, d in degrees.items() if d == -1]
        if len(wild) > 1:
            raise ConfigError(f"parallel.{wild[1]}", "only one parallel degree may be -1")
        fixed = 1
        for axis, d in degrees.items():
            if d != -1:
                if d < 1:
                    raise ConfigError(f"parallel.{axis}", f"must be >= 1 or -1, got {d}")
                fixed *= d
        if wild:
            if world_size % fixed:
                raise ConfigError(
                    f"parallel.{wild[0]}",
                    f"world size {world_size} is not divisible by the product of the other degrees ({fixed})",
                )
            degrees[wild[0]] = world_size // fixed
        product = 1
        for d in degrees.values():
            product *= d
        if product != world_size:
            desc = " x ".join(f"{a}={degrees[a]}" for a in AXES)
            raise ConfigError("parallel", f"{desc} = {product} ranks, but the world size is {world_size}")
        for axis in AXES:
            if degrees[axis] > 1 and axis not in IMPLEMENTED_AXES:
                raise ConfigError(
                    f"parallel.{axis}", f"degree {degrees[axis]} requested, but only {', '.join(IMPLEMENTED_AXES)} > 1 is supported in this build"
                )
        return cls(**degrees, world_size=world_size, rank=rank, device=device or torch.device("cpu"))

    # Coordinates: rank = tp_rank + tp*(cp_rank + cp*(dp_rank + dp*pp_rank)).
    def _coord(self, axis: str) -> int:
        stride = 1
        for a in AXES:
            if a == axis:
                return (self.rank // stride) % getattr(self, a)
            stride *= getattr(self, a)
        raise KeyError(axis)

    @property
    def tp_rank(self) -> int:
        return self._coord("tp")

    @property
    def cp_rank(self) -> int:
        return self._coord("cp")

    @property
    def dp_rank(self) -> int:
        return self._coord("dp")

    @property
    def pp_rank(self) -> int:
        return self._coord("pp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group(self, name: str):
        """The process group of an axis (None for an axis of size one or a single-process run)."""
        return self.groups.get(name)

    def build_groups(self) -> None:
        """Create the data-parallel group. Every rank must call this, in the same order (a collective)."""
        if self.world_size == 1:
            return
        stride = self.tp * self.cp
        for pp_rank in range(self.pp):
            for inner in range(stride):
                base = pp_rank * self.dp * stride + inner
                ranks = [base + i * stride for i in range(self.dp)]
                grp = dist.new_group(ranks) if self.dp < self.world_size else dist.group.WORLD
                if self.rank in ranks:
                    self.groups["dp"] = grp
        self.groups["world"] = dist.group.WORLD

    def axis_seed(self, seed: int, axis: str) -> int:
        """Seed that differs across ranks of `axis` and agrees along every other axis."""
        return seed + 1_000_003 * self._coord(axis)


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("train.device", "cuda requested but no CUDA device is available")
        if requested == "cuda":
            requested = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(requested))
    return torch.device(requested)


def init_process_group(timeout_minutes: float = 30.0) -> None:
    """Join the job's process group once (env:// rendezvous). gloo on CPU, NCCL+gloo on CUDA.

    MEGAEFF_DIST_BACKEND overrides the choice (e.g. `gloo` to debug a GPU node without NCCL).
    """
    if dist.is_initialized():
        return
    backend = os.environ.get("MEGAEFF_DIST_BACKEND", "auto")
    if backend == "auto":
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
