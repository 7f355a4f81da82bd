"""What a step with a NaN/inf loss or gradient norm does (`train.nonfinite`), and the check before every save.

The decision needs no collective of its own: the loss the trainer tests is already summed over pp, cp and dp, and
the gradient norm is the global one (megaeff/distributed/grad_norm.py: reduced over dp x cp, tp and pp), so every
rank tests the same two numbers and takes the same branch. No rank can skip or stop while another steps.

- `stop` (the default): raise `NonFiniteError` (exit `EXIT_NONFINITE`) before the optimizer step, naming the step.
  The parameters are still those of the previous, finite step and nothing is saved from the bad one.
- `skip`: drop the update as Megatron's skipped iterations do: gradients are discarded, neither the optimizer nor
  the LR scheduler steps (the schedule stays where the last applied update left it), while the step counter and
  the data position advance (the same batch would most likely fail again). Skips are counted (`nonfinite_skips`
  in metrics.jsonl); `max_consecutive` skips in a row stop the run as `stop` does.

Independently of the policy, `check_state_finite` runs before every checkpoint: an update computed from finite
gradients can still overflow the weights or the optimizer moments, and such a state must never become `latest`
(pruning would then delete the good checkpoints behind it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Optional, Tuple

import torch

from megaeff.distributed.comm import all_reduce_scalar
from megaeff.errors import NonFiniteError

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims

POLICIES = ("stop", "skip")
# Dtypes `torch.isfinite` checks; FP8 codes (COAT moments) are covered by their float32 scales.
CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NonFiniteGuard:
    def __init__(self, policy: str, max_consecutive: int):
        if policy not in POLICIES:
            raise ValueError(f"unknown non-finite policy {policy!r}; known: {', '.join(POLICIES)}")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped = 0  # steps skipped in this process (the metrics' nonfinite_skips)
        self.consecutive = 0

    def admit(self, step: int, loss: float, grad_norm: float) -> bool:
        """True: apply the update of `step` (1-based, the step being completed). False: skip it. Raises
        NonFiniteError when the run must stop. Every rank passes the same reduced values (module docstring)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        what = f"loss {loss} / gradient norm {grad_norm}"
        if self.policy == "stop":
            raise NonFiniteError(
                f"step {step}: non-finite {what}; stopped before the update, no checkpoint was written from this "
                "state (train.nonfinite=stop). Resume from the last checkpoint with a lower optim.lr, or set "
                "train.nonfinite=skip to drop such updates"
            )
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: non-finite {what} for {self.consecutive} steps in a row "
                f"(train.nonfinite_max_consecutive={self.max_consecutive}); stopped, no checkpoint was written from "
                "this state. Resume from the last checkpoint with a lower optim.lr"
            )
        return False


def first_nonfinite(named: Iterable[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first floating tensor holding a NaN or inf, or None."""
    for name, t in named:
        if torch.is_tensor(t) and t.dtype in CHECKED_DTYPES and not bool(torch.isfinite(t).all()):
            return name
    return None


def _state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    names = {p: n for n, p in model.named_parameters()}
    yield from model.named_parameters()
    for p, state in optimizer.state.items():
        for key, value in state.items():
            yield f"optimizer state {key!r} of {names.get(p, '?')}", value


def check_state_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dims: ParallelDims, step: int) -> None:
    """Raise NonFiniteError on every rank if any rank's parameters or optimizer state hold a NaN/inf. Collective
    over the world when there are several ranks (each holds only its shards)."""
    bad = first_nonfinite(_state_tensors(model, optimizer))
    flag = float(bad is not None)
    if dims.world_size > 1:
        flag = all_reduce_scalar(
            flag, dims.group("world"), "world", dims.comm_stats, dims.device, op=torch.distributed.ReduceOp.MAX
        )
    if flag > 0:
        where = f" ({bad} on rank {dims.rank})" if bad is not None else " (on another rank)"
        raise NonFiniteError(
            f"step {step}: the model or optimizer state holds non-finite values{where}; the checkpoint was not "
            "written. Resume from the last checkpoint with a lower optim.lr"
        )
