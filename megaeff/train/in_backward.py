"""Optimizer in backward (`optim.in_backward=true`): each parameter is updated by its own optimizer step as soon
as its gradient is final for the step, and the gradient is freed at once.

Final means: the last micro-batch's backward has accumulated into it, and it is complete (summed over dp x cp,
and over tp where tensor/sequence parallelism leaves partial sums: those are all-reduced inside autograd, by
`copy_to_region`, before the gradient reaches `.grad`). Earlier micro-batches accumulate into `.grad` as usual,
so with `train.grad_accum > 1` the gradient buffers exist until the last backward. The gradient synchronization
(`GradSync.set_final_hook`, megaeff/distributed/parallel_model.py) says when a gradient is final:

- no dp x cp (any tp, pp): a post-accumulate-grad hook during the last backward of this rank's step (on a
  pipeline: its last micro-batch; with virtual stages, the other chunks are updated after the step's backwards);
- FSSDP: each unit's shards as their reduce-scatter of the last micro-batch lands, during backward; hybrid and
  replicated tensors after their all-reduce in `finish()`;
- bucketed all-reduce: each bucket after its all-reduce, in `finish()`. Gradients are views into static
  buckets, so this layout frees no gradient memory (the update still runs per parameter).

Parameters the sync never reports (distributed MoE experts, FSSDP's sparse embedding rows, chunks of a virtual
pipeline that finished early) are updated after the step's backwards (`end`), in the optimizer's order.

Clipping (`optim.grad_clip > 0`). Global-norm clipping needs every gradient before the first update, which this
mode no longer holds. megaeff clips each parameter by the norm of its *logical* gradient instead: coefficient
max_norm / (norm + 1e-6) clamped to 1, torch's rule applied per tensor, so the result does not depend on the
layout (FSSDP shards' squares are summed over dp x cp: one all-reduce of a vector per unit, in the same order on
every rank). This differs from the paper setups (global-norm clipping at 1.0): a step whose global norm exceeds
the threshold is scaled tensor by tensor rather than uniformly (only the tensors above the threshold shrink,
each to it), so large steps move further than under global clipping. A step whose global norm is below the
threshold is unchanged (no tensor's norm exceeds the global one): a clip that never triggers is exact. Tensor
parallelism with clipping and distributed MoE experts with clipping are refused (`validate_in_backward`).
The `grad_norm` metric is the global norm of the unclipped gradient, accumulated from the updates, with the
rule of megaeff/distributed/grad_norm.py, so it equals the ordinary path's value (to float64 summation order).

Non-finite gradients. The update happens before the step's loss is known, so `train.nonfinite=skip` (which drops
a whole step) is refused. Under `stop`, a parameter whose gradient is non-finite is not updated (its gradient is
dropped); the step's gradient norm is then non-finite and the guard stops the run (exit 65) after the step, so
nothing is saved from the partially updated state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Sequence

import torch

from megaeff.distributed.comm import all_reduce
from megaeff.distributed.grad_norm import GradSquares, square_sum
from megaeff.layers.param_meta import param_meta

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims
    from megaeff.distributed.parallel_model import GradSync
    from megaeff.optim.per_param import PerParamOptimizer


class InBackwardUpdates:
    """Steps `optimizer`'s parameters one at a time from a GradSync's final-gradient hook (module docstring).
    `max_norm` > 0: per-parameter clipping by the logical gradient norm; `dp_sharded`: parameters are FSSDP
    shards (their logical squares are summed over dp x cp)."""

    def __init__(self, optimizer: PerParamOptimizer, dims: ParallelDims, *, max_norm: float, dp_sharded: bool):
        self.optimizer, self.dims = optimizer, dims
        self.max_norm, self.dp_sharded = float(max_norm), bool(dp_sharded)
        self.params: List[torch.Tensor] = list(optimizer.params())
        self.owned = {id(p) for p in self.params}
        self.squares = GradSquares(self.params, dims, dp_sharded=dp_sharded)
        self.stepped: set = set()
        self.skipped_nonfinite = 0  # parameters of this step left unchanged for a non-finite gradient

    def describe(self) -> str:
        clip = (
            f"optim.grad_clip={self.max_norm:g} clips each parameter by the norm of its own logical gradient "
            "(not the global norm; docs/memory.md)"
            if self.max_norm > 0
            else "no clipping"
        )
        return f"optimizer in backward: each parameter updated as its gradient is final, gradient freed; {clip}"

    # ------------------------------------------------------------------ one step
    def begin(self, grad_sync: GradSync) -> None:
        """Before the step's first backward."""
        self.squares.reset()
        self.stepped.clear()
        self.skipped_nonfinite = 0
        grad_sync.set_final_hook(self.on_final)

    def on_final(self, params: Sequence[torch.Tensor]) -> None:
        """The gradients of `params` are final: clip, update, free. Every rank calls this with the same list
        (a collective under FSSDP with clipping)."""
        todo = [p for p in params if id(p) in self.owned and id(p) not in self.stepped]
        if not todo:
            return
        local = torch.zeros(len(todo), dtype=torch.float64)
        for i, p in enumerate(todo):
            if p.grad is not None:
                local[i] = square_sum(p.grad).cpu()
                self.squares.add(p, local[i])
        logical = local
        if self.max_norm > 0 and self.dp_sharded and self.dims.size("dp_cp") > 1:
            weights = torch.tensor([1.0 / param_meta(p).dp_replicas for p in todo], dtype=torch.float64)
            logical = all_reduce((local * weights).to(self.dims.device), self.dims.comm("dp_cp")).cpu()
        for p, sq in zip(todo, logical.tolist()):
            self.stepped.add(id(p))
            if p.grad is None:
                continue
            if not math.isfinite(sq):
                self.skipped_nonfinite += 1
                p.grad = None  # never applied: the guard stops the run after the step
                continue
            if self.max_norm > 0:
                coef = self.max_norm / (math.sqrt(sq) + 1e-6)
                if coef < 1.0:
                    p.grad.detach().mul_(coef)
            self.optimizer.step_param(p, free_grad=True)

    def end(self, grad_sync: GradSync) -> float:
        """After the step's backwards and `grad_sync.finish()`: update what the sync did not report, in the
        optimizer's order; returns the global norm of the unclipped gradient (a collective)."""
        grad_sync.set_final_hook(None)
        self.on_final(self.params)
        return self.squares.total()
