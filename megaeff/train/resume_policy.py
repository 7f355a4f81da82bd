"""What a resume does with a config that differs from the checkpoint's (`config.yaml` in the checkpoint directory).

Every difference is logged. Each field is in one of three classes (`RESUME_POLICY`, the most specific entry wins;
docs/reliability.md has the same table):

- `honour`: the new value runs although the checkpoint holds state for it. The optimizer's param groups (peak LR,
  betas, eps, weight decay) are taken from the new config after the checkpoint is loaded, and the LR scheduler is
  rebuilt from the new schedule fields and keeps only its step count: Megatron's `--override-opt_param-scheduler`.
- `allow`: run-time knobs and the run's length; the new value simply runs.
- `refuse`: what would silently change the model, its data or the meaning of the saved state (shapes, method,
  seed: sparse supports and data order derive from it, data, tokenizer, optimizer state formats). The run stops
  with one error naming every such field; to change one, start a new run (`train.resume=none` or another run_dir).

Since the honoured values are the ones that run, the next checkpoint's config.yaml records what actually ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from megaeff.errors import CheckpointError

HONOUR, ALLOW, REFUSE = "honour", "allow", "refuse"

# key (a section or a dotted field) -> (class, why). A field not covered is refused; tests/unit/test_resume_policy.py
# checks that every field of the schema is covered by an entry written for it.
RESUME_POLICY: Dict[str, Tuple[str, str]] = {
    "model": (REFUSE, "the model's shape and parameterization"),
    "model.attention_backend": (ALLOW, "an implementation choice; same function"),
    "model.init_std": (ALLOW, "only the first start initializes"),
    "model.init_from": (ALLOW, "only the first start initializes; a resume loads the checkpoint"),
    "method": (REFUSE, "the layers' parameterization (supports, scales, ranks)"),
    "method.sltrain_costs": (ALLOW, "how SLTrain's auto path is chosen; same function, round-off only"),
    "optim": (HONOUR, "optimizer hyperparameters and LR schedule: the new values override the checkpoint's"),
    "optim.name": (REFUSE, "the optimizer state format"),
    "optim.first_moment": (REFUSE, "the FP8 optimizer state format"),
    "optim.second_moment": (REFUSE, "the FP8 optimizer state format"),
    "optim.expand": (REFUSE, "the FP8 optimizer state format"),
    "optim.min_fp8_numel": (REFUSE, "which tensors keep FP8 optimizer states"),
    "optim.impl": (ALLOW, "an implementation choice"),
    "optim.fp8_backend": (ALLOW, "an implementation choice (kernels agree bit for bit)"),
    "optim.galore_rank": (REFUSE, "the shapes of GaLore's projected moments and projector"),
    "optim.galore_side": (REFUSE, "the shapes of GaLore's projected moments and projector"),
    "optim.galore_cross_head": (REFUSE, "the side, so the shapes, of GaLore's attention state"),
    "precision": (ALLOW, "compute precision only; master weights and states stay float32"),
    "precision.name": (REFUSE, "the optimizer state format (coat keeps FP8 states)"),
    "precision.fp8_optimizer_states": (REFUSE, "the optimizer state format"),
    "parallel": (ALLOW, "checkpoints are layout-independent"),
    "data": (REFUSE, "the training data, its order and tokenization"),
    "data.cache_dir": (ALLOW, "where index caches live; their contents are keyed on the data"),
    "train": (ALLOW, "run-time knobs: length, intervals, batch split, limits, policies"),
    "train.seed": (REFUSE, "data order, sparse supports and dropout streams derive from it"),
    "logging": (ALLOW, "reporting only"),
    "name": (ALLOW, "a label"),
    "run_dir": (ALLOW, "a resume may start from another directory's checkpoint"),
}


def policy_of(key: str) -> Tuple[str, str]:
    """The entry of the most specific RESUME_POLICY key covering dotted `key`; refuse when none does."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        entry = RESUME_POLICY.get(".".join(parts[:n]))
        if entry is not None:
            return entry
    return REFUSE, "not classified for resume"


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts -> {dotted key: leaf}; lists are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


class Missing:
    """A field one of the two configs does not have (written by another version of megaeff)."""

    def __repr__(self) -> str:
        return "<absent>"


MISSING = Missing()


def config_differences(saved_yaml: str, current_yaml: str) -> List[Tuple[str, Any, Any]]:
    """(key, checkpoint value, new value) of every leaf that differs; a leaf absent on one side is MISSING there."""
    from omegaconf import OmegaConf

    def leaves(text: str) -> Dict[str, Any]:
        return flatten(OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {})

    old, new = leaves(saved_yaml), leaves(current_yaml)
    return [
        (k, old.get(k, MISSING), new.get(k, MISSING))
        for k in sorted(set(old) | set(new))
        if old.get(k, MISSING) != new.get(k, MISSING)
    ]


def check_resume_config(resume_dir: Path, current_yaml: str) -> List[str]:
    """Compare the checkpoint's config.yaml with the new run's; raise CheckpointError naming every refused field,
    else return the lines to log (one per difference)."""
    saved = Path(resume_dir) / "config.yaml"
    if not saved.is_file():
        return [f"resume: {resume_dir} has no config.yaml; the configs were not compared"]
    try:
        diffs = config_differences(saved.read_text(), current_yaml)
    except Exception as exc:  # an unreadable record is not a reason to lose the run: say so and go on
        return [f"resume: cannot read {saved} ({type(exc).__name__}: {exc}); the configs were not compared"]
    lines, refused = [], []
    for key, old, new in diffs:
        action, why = policy_of(key)
        if old is MISSING or new is MISSING:
            action, why = ALLOW, "a field only one of the two megaeff versions has"
        change = f"{key}: {old!r} -> {new!r}"
        if action == REFUSE:
            refused.append(change)
        lines.append(f"resume: {change} ({action}: {why})")
    if refused:
        raise CheckpointError(
            resume_dir,
            f"the config fields {'; '.join(refused)} do not match the checkpoint's, and a resume cannot change "
            "them. Restore them, or start a new run (train.resume=none, or another run_dir)",
        )
    return lines


def optimizer_hparams(optimizer) -> List[Dict[str, Any]]:
    """The param groups' hyperparameters as the new config built them (everything but the parameters)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def override_hparams(optimizer, hparams: Optional[List[Dict[str, Any]]]) -> None:
    """After a load restored the checkpoint's param groups, put the new config's values back (`honour`)."""
    if hparams is None:
        return
    for group, hp in zip(optimizer.param_groups, hparams):
        group.update(hp)
