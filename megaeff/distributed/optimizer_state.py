"""The optimizer state keyed by logical parameter name instead of position, so that it survives re-layouts: the
form checkpoints hold (megaeff/train/checkpoint/) and the logical views convert (megaeff/distributed/logical_state.py,
megaeff/distributed/fssdp/state.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from megaeff.errors import CheckpointError


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict:
    """Key the optimizer state by logical parameter name instead of position, so it survives re-layouts."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {k: v for k, v in s.items()} for p, s in optimizer.state.items()}
    hparams = [
        {k: v for k, v in g.items() if k != "params"} | {"names": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    return {"hparams": hparams, "state": state}


def load_optimizer_state_by_name(model, optimizer, saved: Dict, path: Path, partial: bool = False) -> None:
    """`partial`: the model is one pipeline stage's part of the checkpoint's (state of other stages is skipped)."""
    params = dict(model.named_parameters())
    groups = saved["hparams"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            path, f"optimizer has {len(optimizer.param_groups)} param groups, checkpoint {len(groups)}"
        )
    for group, hp in zip(optimizer.param_groups, groups):
        current = [n for n, p in model.named_parameters() if any(p is q for q in group["params"])]
        fits = set(current) <= set(hp["names"]) if partial else sorted(current) == sorted(hp["names"])
        if not fits:
            raise CheckpointError(path, "optimizer parameter groups do not match the model")
        for k, v in hp.items():
            if k != "names":
                group[k] = v
    # Fused and capturable AdamW keep `step` on the parameter's device; the others keep it on the CPU.
    step_on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    optimizer.state.clear()
    for name, st in saved["state"].items():
        if name not in params:
            if partial:
                continue
            raise CheckpointError(path, f"optimizer state for unknown parameter {name!r}")
        p = params[name]
        # No dtype casts: FP8 codes and their metadata must come back bit for bit.
        restored = {
            k: (v.to(p.device) if torch.is_tensor(v) and (k != "step" or step_on_device) else v) for k, v in st.items()
        }
        check = getattr(optimizer, "check_state", None)
        problem = check(name, p, restored) if check is not None else None
        if problem is not None:
            raise CheckpointError(path, f"optimizer state does not fit the configured optimizer: {problem}")
        optimizer.state[p] = restored
