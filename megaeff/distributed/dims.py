"""ParallelDims: parallel degrees -> rank coordinates, process groups and per-axis seeds.

Rank order follows Megatron: tp innermost, then cp, then dp, pp outermost, so that the most
communication-hungry axis (tp) stays within a node. The object is passed explicitly to every component that
needs it; nothing reads parallel state from module globals.

Groups (`build_groups`, a collective every rank calls once): one per axis (`tp`, `cp`, `dp`, `pp`), the
combinations other components reduce over (`dp_cp`: gradients, since cp ranks hold the same weights and see
different tokens; `tp_cp`: the model-parallel ranks of one stage), and `world`. A group whose ranks are the
whole world is `dist.group.WORLD`; a group of one rank is None, and every collective in `comm.py` is a no-op on
None, so single-rank axes cost nothing. `mesh()` builds a DeviceMesh over the same layout on demand, for the
torch-native APIs (FSDP2, DTensor); nothing here depends on it.

`IMPLEMENTED_AXES` gates what a *training config* may ask for (`from_config`): every axis is wired.
Layer-level code and tests build any layout with `from_config(..., implemented=AXES)` or the constructor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megaeff.config.parallel import AXES, resolve_degrees
from megaeff.distributed.comm import CommGroup, CommStats
from megaeff.errors import ConfigError

if TYPE_CHECKING:
    from megaeff.config.parallel import ParallelConfig

IMPLEMENTED_AXES = AXES
# Combined groups built alongside the axes: name -> the axes whose ranks it spans.
COMBINED = {"dp_cp": ("cp", "dp"), "tp_cp": ("tp", "cp")}


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

    def __post_init__(self) -> None:
        if self.tp * self.cp * self.dp * self.pp != self.world_size:
            raise ConfigError(
                "parallel", f"tp={self.tp} x cp={self.cp} x dp={self.dp} x pp={self.pp} != world size {self.world_size}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @classmethod
    def from_config(
        cls,
        pcfg: ParallelConfig,
        world_size: int,
        rank: int = 0,
        device: Optional[torch.device] = None,
        *,
        implemented: Sequence[str] = IMPLEMENTED_AXES,
    ) -> "ParallelDims":
        """Validate a `parallel` config against the world size. `implemented`: the axes allowed above 1 (the
        trainer's default refuses what it cannot run yet; layer tests pass `AXES`)."""
        degrees = resolve_degrees({axis: int(getattr(pcfg, axis)) for axis in AXES}, world_size)
        for axis in AXES:
            if degrees[axis] > 1 and axis not in implemented:
                raise ConfigError(
                    f"parallel.{axis}",
                    f"degree {degrees[axis]} requested, but only {', '.join(implemented)} > 1 is supported "
                    "in this build",
                )
        return cls(**degrees, world_size=world_size, rank=rank, device=device or torch.device("cpu"))

    # ------------------------------------------------------------------ coordinates
    # rank = tp_rank + tp*(cp_rank + cp*(dp_rank + dp*pp_rank)).
    def _coord(self, axis: str, rank: Optional[int] = None) -> int:
        rank = self.rank if rank is None else rank
        stride = 1
        for a in AXES:
            if a == axis:
                return (rank // stride) % getattr(self, a)
            stride *= getattr(self, a)
        raise KeyError(axis)

    def coords(self, rank: Optional[int] = None) -> Dict[str, int]:
        return {a: self._coord(a, rank) for a in AXES}

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

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    # ------------------------------------------------------------------ groups
    def _axes_of(self, name: str) -> Tuple[str, ...]:
        if name in AXES:
            return (name,)
        if name in COMBINED:
            return COMBINED[name]
        if name == "world":
            return AXES
        raise KeyError(f"unknown process group {name!r}; known: {', '.join((*AXES, *COMBINED, 'world'))}")

    def group_ranks(self, name: str) -> List[List[int]]:
        """Every group of `name` as a sorted rank list, in a fixed order (the same on every rank)."""
        spanned = self._axes_of(name)
        by_key: Dict[Tuple[int, ...], List[int]] = {}
        for r in range(self.world_size):
            key = tuple(self._coord(a, r) for a in AXES if a not in spanned)
            by_key.setdefault(key, []).append(r)
        return sorted(by_key.values())  # by lowest rank

    def size(self, name: str) -> int:
        n = 1
        for a in self._axes_of(name):
            n *= getattr(self, a)
        return n

    def rank_in(self, name: str) -> int:
        """This rank's index inside its `name` group (ranks are numbered by global rank)."""
        for ranks in self.group_ranks(name):
            if self.rank in ranks:
                return ranks.index(self.rank)
        raise AssertionError("unreachable: every rank is in one group of each kind")

    def group(self, name: str):
        """The process group of an axis or combination (None for a group of one or a single-process run)."""
        return self.groups.get(name)

    def comm(self, name: str) -> CommGroup:
        """The handle `comm.py`'s collectives take: the group, its name for the byte counters, and the stats."""
        return CommGroup(name, self.group(name), self.comm_stats, self.size(name), self.rank_in(name))

    def build_groups(self, names: Iterable[str] = (*AXES, *COMBINED)) -> None:
        """Create the process groups. Every rank must call this with the same `names` (new_group is collective,
        even for groups the caller is not in)."""
        if self.world_size == 1:
            return
        self.groups["world"] = dist.group.WORLD
        made: Dict[Tuple[int, ...], object] = {}  # identical rank sets share one communicator (dp_cp when cp=1)
        for name in names:
            for ranks in self.group_ranks(name):
                key = tuple(ranks)
                if len(ranks) == 1:
                    grp = None
                elif len(ranks) == self.world_size:
                    grp = dist.group.WORLD
                elif key in made:
                    grp = made[key]
                else:
                    grp = made[key] = dist.new_group(ranks)
                if self.rank in ranks:
                    self.groups[name] = grp

    def mesh(self):
        """A DeviceMesh (pp, dp, cp, tp), outermost first, with the same rank order; built on demand because it
        creates its own communicators."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(
            self.device.type, (self.pp, self.dp, self.cp, self.tp), mesh_dim_names=("pp", "dp", "cp", "tp")
        )

    # ------------------------------------------------------------------ seeds
    def axis_seed(self, seed: int, axis: str) -> int:
        """Seed that differs across ranks of `axis` and agrees along every other axis."""
        return seed + 1_000_003 * self._coord(axis)

    def seed_for(self, seed: int, distinct: Sequence[str] = ()) -> int:
        """Seed that differs across the ranks of every axis in `distinct` and agrees along the others.

        Dropout on tp-sharded activations needs `distinct=("tp",)` (each shard masks different elements, as the
        single-process mask would), while dropout on replicated or sequence-parallel activations must agree over
        tp (`distinct=()`); pipeline stages hold different layers, so `("pp",)` keeps their streams apart. Every
        choice agrees over dp, so data-parallel replicas stay identical.
        """
        for axis in distinct:
            if axis not in AXES:
                raise KeyError(axis)
        if not distinct:
            return seed
        mixed, stride = 0, 1
        for axis in AXES:
            if axis in distinct:
                mixed += stride * self._coord(axis)
                stride *= getattr(self, axis)
        return seed + 1_000_003 * mixed


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


def set_collective_timeout(dims: ParallelDims, seconds: float) -> None:
    """`train.collective_timeout_s` on every process group of the run (the world's and the ones `build_groups`
    made). The process group exists before the config is read (the ranks agree on the run directory through it),
    so the timeout is set afterwards, as torchtitan does (`_set_pg_timeout`, torch >= 2.2); with a torch that lacks
    it the groups keep the timeout they were created with (30 minutes)."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if dims.world_size == 1 or setter is None or not dist.is_initialized():
        return
    timeout = timedelta(seconds=seconds)
    groups = {id(g): g for g in (dist.group.WORLD, *dims.groups.values()) if g is not None}
    for group in groups.values():
        setter(timeout, group)
