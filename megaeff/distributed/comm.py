"""Collectives used by the trainer, each one counted in bytes by group and kind.

Every collective in megaeff goes through this module so that the per-step metrics can report exactly what was
sent. The counters live in a `CommStats` object owned by `ParallelDims` (no module-level state).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Optional

import torch
import torch.distributed as dist


class CommStats:
    """Bytes sent through each (group, kind) pair since the last `reset`."""

    def __init__(self) -> None:
        self._bytes: Dict[str, int] = defaultdict(int)

    def record(self, group_name: str, kind: str, nbytes: int) -> None:
        self._bytes[f"{group_name}/{kind}"] += int(nbytes)

    def snapshot(self) -> Dict[str, int]:
        return dict(self._bytes)

    def total(self) -> int:
        return sum(self._bytes.values())

    def reset(self) -> None:
        self._bytes.clear()


def all_reduce_(tensor: torch.Tensor, group, group_name: str, stats: Optional[CommStats], op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce; a no-op for a group of one. Counts the payload once per call (not per algorithm hop)."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    if stats is not None:
        stats.record(group_name, "all_reduce", tensor.numel() * tensor.element_size())
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_scalar(
    value: float, group, group_name: str, stats: Optional[CommStats], device, op=dist.ReduceOp.SUM
) -> float:
    # NCCL only reduces device tensors, so the scalar travels on the training device.
    t = torch.tensor([value], dtype=torch.float64, device=device)
    return float(all_reduce_(t, group, group_name, stats, op)[0])
