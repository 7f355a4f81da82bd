"""What `parallelize` (megaeff/distributed/parallelize.py) hands the trainer: this rank's part of the model and
the two objects the step and the checkpoints talk to, behind the two interfaces defined here.

`GradSync`: the gradient synchronization of one optimizer step over dp x cp. The one accumulation loop
(megaeff/train/step.py) calls `prepare(final=i == last)` before each micro-batch's backward and `finish()` after
the last one; gradients are then summed over every rank that holds the same parameters. With the optimizer in
backward, `set_final_hook` asks it to report each gradient as soon as it is final.
Implementations: `GradReducer` (replicated parameters, bucketed all-reduce; data_parallel/bucketed.py) and
`FSSDP` (sharded parameters, reduce-scatter; fssdp/).

`LogicalState`: the layout-independent view of the model and optimizer state that checkpoints go through
(megaeff/train/checkpoint/): gather this rank's parts into logical tensors by global name, and cut logical
tensors back into this rank's parts; for sharded checkpoints, which boxes of the logical tensors each local
tensor holds (`local_pieces`). Implementations: `logical_state.LogicalState` (tensor-parallel shards and
distributed experts) and `FSSDP` (which adds its dp x cp shards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from megaeff.distributed.chunk_boxes import Pieces
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

    def set_final_hook(self, hook: Optional[Callable[[Sequence[torch.Tensor]], None]]) -> None:
        """Optimizer in backward (megaeff/train/in_backward.py): from now on, call `hook(params)` as soon as the
        gradients of `params` are final for the step (the last micro-batch's, complete over dp x cp), at the
        latest in `finish()`; the hook may update the parameters and free their gradients. Every rank passes
        the same lists in the same order. Parameters never reported are the caller's to finish. None: no hook."""


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

    def local_pieces(self, name: str, key: str, tensor: torch.Tensor) -> Optional[Dict[str, Pieces]]:
        """Which boxes of which logical tensors this rank's `tensor` holds, for sharded checkpoints (no
        communication). `name`: a key of this rank's `model.state_dict()` / `named_parameters()` (a logical name,
        or a distributed experts' flat parameter); `key`: "" for the parameter or buffer itself, else its
        optimizer state key ("exp_avg", COAT's FP8 codes, their `*_meta` rows, "step", ...); `tensor`: this
        rank's tensor for it.

        Returns {logical tensor name: Pieces(logical_shape, chunks)} (megaeff/distributed/chunk_boxes.py, also
        importable from megaeff.distributed.logical_state): each chunk is (offsets in the logical tensor, a view
        that aliases `tensor`, shaped as the box), so a load writes in place. `*_meta`: the logical tensor is
        the logical parameter's metadata [n_groups, META_FIELDS] and offsets count group rows. Scalars: shape
        (), one chunk at (); an expert flat's scalar (AdamW's `step`) is shared by all of its logical tensors.
        A tensor held whole (replicated) is one chunk at the origin on every replica; otherwise the boxes of all
        ranks cover each logical tensor exactly once, and no box covers padding (an empty shard has no chunk).
        None: this tensor has no box form (SLTrain's sparse values of a row-parallel layer, COAT metadata of a
        cols-split parameter; the same answer on every rank holding it): gather it with `gather(name, tensor,
        key)`, a collective over its groups. A tensor of an unknown shape for its key raises ValueError."""

    def local_logical_names(self, name: str) -> List[str]:
        """The logical tensors a local state name covers: itself, or an experts' flat parameter's logical
        tensors (no communication)."""

    def logical_buffers(self) -> Dict[str, torch.Tensor]:
        """Persistent buffers of the single-process state dict that this rank's state dict lacks (distributed
        experts' index checksums), by logical name, identical on every rank: save whole, compare on load."""


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
