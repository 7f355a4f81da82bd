"""The cluster a plan is for, and which link each parallel axis crosses.

Bandwidths are per GPU per direction, in GB/s (gigabytes per second): what one rank can send while it receives as
much. Presets (vendor datasheets; docs/planner.md):
- h100_sxm: H100 SXM5 80 GB, 8 per node (HGX/DGX H100), NVLink 4 at 900 GB/s bidirectional = 450 GB/s per
  direction, one ConnectX-7 InfiniBand NDR 400 Gb/s NIC per GPU = 50 GB/s, 989 TFLOP/s dense bf16.
- a100_80gb: A100 SXM4 80 GB, 8 per node (HGX/DGX A100), NVLink 3 at 600 GB/s bidirectional = 300 GB/s per
  direction, one HDR 200 Gb/s NIC per GPU = 25 GB/s, 312 TFLOP/s dense bf16.

Rank placement is megaeff's (megaeff/distributed/dims.py): tp innermost, then cp, dp, pp outermost, global rank r
on node r // gpus_per_node. A process group whose ranks all sit on one node uses NVLink; one that spans nodes
runs at the NIC's bandwidth (a ring is as slow as its slowest hop).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from megaeff.distributed.dims import ParallelDims
from megaeff.errors import ConfigError


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    gpus_per_node: int
    gpu_mem_gb: float  # per GPU, decimal GB (1e9 bytes)
    intra_gbps: float  # GB/s per GPU per direction inside a node (NVLink)
    inter_gbps: float  # GB/s per GPU per direction between nodes (the GPU's NIC)
    peak_tflops: float  # dense bf16 per GPU

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def as_dict(self) -> Dict[str, object]:
        return {**asdict(self), "world": self.world}


PRESETS: Dict[str, Cluster] = {
    "h100_sxm": Cluster("h100_sxm", 1, 8, 80.0, 450.0, 50.0, 989.0),
    "a100_80gb": Cluster("a100_80gb", 1, 8, 80.0, 300.0, 25.0, 312.0),
}


def make_cluster(preset: str | None = None, **fields) -> Cluster:
    """A preset with any field overridden (None: keep the preset's), or a cluster from the fields alone."""
    given = {k: v for k, v in fields.items() if v is not None}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError("--preset", f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        base = asdict(PRESETS[preset])
        base.update(given)
        cluster = Cluster(**base)
    else:
        missing = [k for k in ("gpu_mem_gb", "intra_gbps", "inter_gbps", "peak_tflops") if k not in given]
        if missing:
            raise ConfigError("--preset", f"without a preset give --{missing[0].replace('_', '-')} (and the rest)")
        cluster = Cluster(
            name="custom", nodes=given.pop("nodes", 1), gpus_per_node=given.pop("gpus_per_node", 8), **given
        )
    for key in ("nodes", "gpus_per_node", "gpu_mem_gb", "intra_gbps", "inter_gbps", "peak_tflops"):
        if getattr(cluster, key) <= 0:
            raise ConfigError(f"--{key.replace('_', '-')}", f"must be > 0, got {getattr(cluster, key)}")
    return cluster


def crosses_node(degrees: Dict[str, int], group: str, gpus_per_node: int) -> bool:
    """Whether some `group` (an axis, `dp_cp`, `tp_cp` or `world`) of the layout spans more than one node."""
    dims = ParallelDims(**degrees, world_size=_product(degrees))
    return any(len({r // gpus_per_node for r in ranks}) > 1 for ranks in dims.group_ranks(group))


def group_size(degrees: Dict[str, int], group: str) -> int:
    return ParallelDims(**degrees, world_size=_product(degrees)).size(group)


def link_gbps(cluster: Cluster, degrees: Dict[str, int], group: str) -> float:
    return cluster.inter_gbps if crosses_node(degrees, group, cluster.gpus_per_node) else cluster.intra_gbps


def _product(degrees: Dict[str, int]) -> int:
    n = 1
    for d in degrees.values():
        n *= d
    return n
