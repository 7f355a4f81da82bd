"""The random number generator states of one rank (CPU and CUDA), saved per rank with every checkpoint."""

from __future__ import annotations

from typing import Dict

import torch


def rng_state() -> Dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
