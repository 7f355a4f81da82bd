"""Learning-rate schedules as pure functions of the step, wrapped in a tiny stateful scheduler.

Linear warmup from 0 to the peak over `warmup_steps`, then cosine decay to `min_lr_ratio` x peak at the last step.
GaLore's code wraps its cosine cycle so that the final update runs at ~1e-7 x peak; megaeff does not copy that
quirk: the multiplier holds at `min_lr_ratio` from the last step on.
"""

from __future__ import annotations

import math
from typing import Dict, List


def lr_multiplier(
    step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, schedule: str = "cosine"
) -> float:
    """Multiplier applied to the peak LR for the update numbered `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    # Decay spans steps warmup..total-1. When warmup ends on the last step there is nothing to decay, and that
    # step runs at the peak.
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRScheduler:
    """Sets each param group's LR from its peak `initial_lr` and the step; state is just the step counter."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float, schedule: str = "cosine"):
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.schedule = schedule
        self.step_count = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._apply()

    def _apply(self) -> None:
        mult = lr_multiplier(self.step_count, self.total_steps, self.warmup_steps, self.min_lr_ratio, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * mult

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
