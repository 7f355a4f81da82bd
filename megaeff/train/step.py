"""The micro-batches of one optimizer step: one gradient-accumulation loop, whatever the schedule.

A schedule is this rank's ordered list of actions, the forward (F) or backward (B) of one micro-batch on one
model chunk (megaeff/distributed/pipeline/schedule.py's `Action`). Without a pipeline it is the trivial
F0 B0 F1 B1 ... (`plain_actions`), each action run by `PlainStep` on the whole model; on a pipeline it is
GPipe, 1F1B or interleaved 1F1B, each action run by `PipelineStep` on one stage (with its p2p transfers;
megaeff/distributed/pipeline/runner.py). `accumulate` is the loop both run, and the one place the gradient
synchronization is ordered (megaeff/distributed/parallel_model.py, `GradSync`):

    for each action:   F -> executor.forward;   B -> grad_sync.prepare(final=<last B>), executor.backward
    executor.drain()   # a pipeline waits for its sends in flight
    grad_sync.finish() # gradients summed over dp x cp, partly during the last backward

Each micro-batch's objective is its sum of token losses divided by the global batch's token count (plus, for
MoE, its share of the balance loss), so the accumulated gradient is that of the whole global batch.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Protocol, Sequence, Tuple

import torch
from torch import nn

from megaeff.distributed.parallel_model import GradSync
from megaeff.distributed.pipeline.schedule import Action
from megaeff.models.moe import moe_aux_loss
from megaeff.precision.saved_bytes import SavedBytes


class StepExecutor(Protocol):
    """What the actions of one step do on this rank, and what they add up to."""

    loss_sum: torch.Tensor  # float64 sum of the token losses this rank computed (0 off a pipeline's last stage)
    act_saved_bytes: int  # bytes autograd kept for backward, max over micro-batches (0 where not measured)
    aux_total: float  # the MoE balance loss added to the objectives (0 without MoE)

    def forward(self, action: Action) -> None: ...

    def backward(self, action: Action) -> None: ...

    def drain(self) -> None: ...


def plain_actions(microbatches: int) -> List[Action]:
    """The trivial schedule: each micro-batch's forward, then its backward."""
    return [Action(kind, mb, 0) for mb in range(microbatches) for kind in "FB"]


def accumulate(actions: Sequence[Action], executor: StepExecutor, grad_sync: GradSync) -> None:
    """Run one step's `actions` in order, synchronizing gradients around their backwards (module docstring)."""
    last_backward = max(i for i, a in enumerate(actions) if a.kind == "B")
    for i, action in enumerate(actions):
        if action.kind == "F":
            executor.forward(action)
        else:
            grad_sync.prepare(final=i == last_backward)
            executor.backward(action)
    executor.drain()
    grad_sync.finish()


class PlainStep:
    """The executor of `plain_actions`: `forward_loss(batch)` is the sum of token losses of the whole model.

    The MoE balance loss of each forward is divided by `aux_divisor` (the micro-batches of the global batch
    whose gradients are summed, times the dp x cp ranks unless distributed experts already return this rank's
    share), so that the step optimizes its mean."""

    def __init__(
        self,
        model: nn.Module,
        batches: List[Dict],
        global_tokens: int,
        forward_loss: Callable[[Dict], torch.Tensor],
        *,
        aux_divisor: int,
    ):
        self.model, self.batches, self.global_tokens = model, batches, global_tokens
        self.forward_loss, self.aux_divisor = forward_loss, aux_divisor
        self.pending: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.act_saved_bytes, self.aux_total = 0, 0.0

    def forward(self, action: Action) -> None:
        # Bytes autograd keeps for backward (parameters excluded): what FP8 activations shrink.
        with SavedBytes(self.model) as saved:
            loss = self.forward_loss(self.batches[action.microbatch])
        self.act_saved_bytes = max(self.act_saved_bytes, saved.bytes)
        objective = loss / self.global_tokens
        aux = moe_aux_loss(self.model)
        if aux is not None:
            aux = aux / self.aux_divisor
            objective = objective + aux
            self.aux_total += float(aux.detach())
        self.pending[action.microbatch] = (loss, objective)

    def backward(self, action: Action) -> None:
        loss, objective = self.pending.pop(action.microbatch)
        objective.backward()
        self.loss_sum += loss.detach().double().cpu()

    def drain(self) -> None:
        """Nothing in flight: every transfer of the plain path is a collective inside forward or backward."""
