"""What a parameter is in the parallel layout: one typed record per parameter, for the consumers that see
parameters only (gradient norm, optimizer, data-parallel filtering, FSSDP).

`parallelize` (megaeff/distributed/parallelize.py) sets it: the tensor-parallel layers when they build their
parameters (`tp_split`, `logical_shape`), `annotate_parameters` (megaeff/distributed/logical_state.py) on every
parameter after materialization, FSSDP's plan (the dp fields, on the original parameters and on the shards it
creates, which copy the tp fields) and the distributed experts (their flat parameters). Everything else reads it
through `param_meta(p)`; a parameter without a record is replicated and has its own shape.

It lives here, below optim and distributed, so that the optimizer reads it without importing distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

TP_SPLITS = ("replicated", "rows", "cols", "support")
DP_SPLITS = ("replicated", "rows")
_ATTR = "megaeff_meta"  # the one attribute a parameter carries


@dataclass(frozen=True)
class ParamMeta:
    """`tp_split`: how tensor parallelism splits the logical tensor (replicated | rows | cols | support).
    `logical_shape`: the single-process tensor's shape (a shard's own shape differs).
    `dp_split`: how FSSDP holds it: replicated, or this rank's dim-0 shard (rows).
    `dp_replicas`: how many dp x cp ranks hold the same values (1 for a shard), for gradient clipping.
    `expert`: a distributed MoE experts' flat parameter (megaeff/distributed/expert_parallel/experts.py): distinct
    on every dp x cp rank and reduced by the experts' own exchange, not by the data-parallel step."""

    tp_split: str = "replicated"
    logical_shape: Tuple[int, ...] = ()
    dp_split: str = "replicated"
    dp_replicas: int = 1
    expert: bool = False

    def __post_init__(self):
        if self.tp_split not in TP_SPLITS:
            raise ValueError(f"tp_split {self.tp_split!r}: expected one of {', '.join(TP_SPLITS)}")
        if self.dp_split not in DP_SPLITS:
            raise ValueError(f"dp_split {self.dp_split!r}: expected one of {', '.join(DP_SPLITS)}")
        object.__setattr__(self, "logical_shape", tuple(int(d) for d in self.logical_shape))


def has_param_meta(p: torch.Tensor) -> bool:
    """Whether `p` carries a record (moving a model off the meta device creates new, unannotated Parameters)."""
    return isinstance(getattr(p, _ATTR, None), ParamMeta)


def param_meta(p: torch.Tensor) -> ParamMeta:
    """`p`'s record; for an unannotated parameter: replicated, its own shape."""
    meta = getattr(p, _ATTR, None)
    return meta if isinstance(meta, ParamMeta) else ParamMeta(logical_shape=tuple(p.shape))


def set_param_meta(p: torch.Tensor, meta: ParamMeta) -> None:
    if not isinstance(meta, ParamMeta):
        raise TypeError(f"expected a ParamMeta, got {type(meta).__name__}")
    setattr(p, _ATTR, meta)
