"""What `parallelize` (megaeff/distributed/parallelize.py) hands the trainer: this rank's part of the model and
the two objects the step and the checkpoints talk to, behind the two interfaces defined here.

`GradSync`: the gradient synchronization of one optimizer step over dp x cp. The one accumulation loop
(megaeff/train/step.py) calls `prepare(final=i == last)` before each micro-batch's backward and `finish()` after
the last one; gradients are then summed over every rank that holds the same parameters.
Implementations: `GradReducer` (replicated parameters, bucketed all-reduce; data_parallel/bucketed.py) and
`FSSDP` (sharded parameters, reduce-scatter; fssdp/).

`LogicalState`: the layout-independent view of the model and optimizer state that checkpoints go through
(megaeff/train/checkpoint.py): gather this rank's parts into logical tensors by global name, and cut logical
tensors back into this rank's parts. Implementations: `logical_state.LogicalState` (tensor-parallel shards and
distributed experts) and `FSSDP` (which adds its dp x cp shards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Protocol, runtime_checkable

from torch import nn

if TYPE_CHECKING:
    from megaeff.distributed.context_parallel.attention import ContextParallelAttention
    from megaeff.distributed.pipeline.stages import StageChunk


@runtime_checkable
class GradSync(Protocol):
    def prepare(self, final: bool) -> None:
        """Before each micro-batch's backward; `final=True` for the last one of the step."""

    def finish(self) -> None:
        """After the last backward: wait for (and complete) the reduction of every gradient."""

    def describe(self) -> str:
        """One line for the run log."""


@runtime_checkable
class LogicalState(Protocol):
    @property
    def sharded(self) -> bool:
        """Whether any tensor of this rank is a part of its logical tensor (else every call is the identity)."""

    def gather_model(self, state: Dict) -> Dict:
        """This rank's `model.state_dict()` -> logical tensors by global name (a collective)."""

    def shard_model(self, state: Dict) -> Dict:
        """Logical tensors by global name -> this rank's state dict (no communication)."""

    def gather_optimizer(self, saved: Dict) -> Dict:
        """Optimizer state by parameter name (checkpoint.optimizer_state_by_name) -> by logical tensor name."""

    def shard_optimizer(self, saved: Dict) -> Dict:
        """The inverse of `gather_optimizer`, for this rank's parameters."""


@dataclass
class ParallelModel:
    """This rank's part of the model under the layout, and what the trainer needs to train and save it.

    `module`: the parameters the optimizer is built on (shards under FSSDP). `chunks`: this rank's pipeline
    stages (empty without pipeline parallelism). `context`: the context-parallel attention, which also shards
    every token tensor of a batch (`context.shard`), or None. `dp_sharded`: parameters are sharded over dp x cp
    (FSSDP), so gradient norms sum over it. `experts_distributed`: MoE experts are spread over dp x cp (expert
    FSSDP or expert parallelism) and reduced by their own exchange, not by `grad_sync`."""

    module: nn.Module
    grad_sync: GradSync
    state: LogicalState
    chunks: List["StageChunk"] = field(default_factory=list)
    context: Optional["ContextParallelAttention"] = None
    dp_sharded: bool = False
    experts_distributed: bool = False
