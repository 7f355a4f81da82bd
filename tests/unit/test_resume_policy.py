"""What a resume does with a changed config (megaeff/train/resume_policy.py; issue 18 item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megaeff.config import to_plain, to_yaml
from megaeff.config.schema import Config
from megaeff.errors import CheckpointError
from megaeff.train.resume_policy import (
    ALLOW,
    HONOUR,
    MISSING,
    REFUSE,
    RESUME_POLICY,
    check_resume_config,
    config_differences,
    flatten,
    optimizer_hparams,
    override_hparams,
    policy_of,
)


def test_every_field_of_the_schema_is_classified():
    """A new config field must be given a resume class on purpose; the table names no field that does not exist."""
    leaves = flatten(to_plain(Config()))
    sections = {k.split(".")[0] for k in leaves}
    for key in leaves:
        assert policy_of(key)[1] != "not classified for resume", key
    for key in RESUME_POLICY:
        assert key in leaves or key in sections, f"RESUME_POLICY names {key!r}, which the schema lacks"


@pytest.mark.parametrize(
    "key,action",
    [
        ("optim.lr", HONOUR),
        ("optim.warmup_steps", HONOUR),
        ("optim.min_lr_ratio", HONOUR),
        ("optim.weight_decay", HONOUR),
        ("optim.grad_clip", HONOUR),
        ("optim.name", REFUSE),
        ("optim.second_moment", REFUSE),
        ("train.steps", ALLOW),
        ("train.eval_interval", ALLOW),
        ("train.seed", REFUSE),
        ("model.dim", REFUSE),
        ("model.n_kv_heads", REFUSE),
        ("model.attention_backend", ALLOW),
        ("method.rank", REFUSE),
        ("data.paths", REFUSE),
        ("data.tokenizer", REFUSE),
        ("data.cache_dir", ALLOW),
        ("precision.name", REFUSE),
        ("precision.autocast_bf16", ALLOW),
        ("parallel.dp", ALLOW),
    ],
)
def test_policy_classes(key, action):
    assert policy_of(key)[0] == action


def _yaml(**changes) -> str:
    cfg = Config()
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        setattr(getattr(cfg, section), field, value)
    return to_yaml(cfg)


def test_differences_tell_null_from_absent():
    """n_kv_heads null -> 2 (a GQA change) is a difference of a field both have; a field one version lacks is
    MISSING, not None."""
    diffs = config_differences(_yaml(), _yaml(model__n_kv_heads=2))
    assert diffs == [("model.n_kv_heads", None, 2)]
    older = _yaml().replace("  nonfinite: stop\n", "")
    assert config_differences(older, _yaml()) == [("train.nonfinite", MISSING, "stop")]


def test_refused_fields_are_named_in_one_error(tmp_path):
    (tmp_path / "config.yaml").write_text(_yaml())
    new = _yaml(model__dim=64, train__seed=7, optim__lr=0.5, train__steps=900)
    with pytest.raises(CheckpointError) as exc:
        check_resume_config(tmp_path, new)
    msg = str(exc.value)
    assert "model.dim: 128 -> 64" in msg and "train.seed: 1234 -> 7" in msg and "do not match" in msg
    assert "optim.lr" not in msg and "train.steps" not in msg  # honoured / allowed ones are not refused


def test_every_difference_is_logged(tmp_path):
    (tmp_path / "config.yaml").write_text(_yaml())
    lines = check_resume_config(tmp_path, _yaml(optim__lr=0.5, train__steps=900, model__attention_backend="math"))
    assert len(lines) == 3
    joined = "\n".join(lines)
    assert "optim.lr: 0.001 -> 0.5 (honour" in joined and "train.steps: 300 -> 900 (allow" in joined
    assert check_resume_config(tmp_path, _yaml()) == []
    assert "no config.yaml" in check_resume_config(tmp_path / "none", _yaml())[0]


def test_override_puts_the_new_hyperparameters_back():
    """The checkpoint's param groups (peak LR included) overwrite the new ones when loaded; the override restores
    the new config's, which the scheduler then scales."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.5, betas=(0.8, 0.9), weight_decay=0.1)
    opt.param_groups[0]["initial_lr"] = 0.5
    fresh = optimizer_hparams(opt)
    opt.param_groups[0].update(lr=1e-3, initial_lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)  # "loaded"
    override_hparams(opt, fresh)
    g = opt.param_groups[0]
    assert (g["lr"], g["initial_lr"], g["betas"], g["weight_decay"]) == (0.5, 0.5, (0.8, 0.9), 0.1)
    assert g["params"] == [p]


def test_the_documented_table_is_the_code_table():
    doc = (Path(__file__).resolve().parents[2] / "docs/reliability.md").read_text()
    for key, (action, why) in RESUME_POLICY.items():
        assert f"| `{key}` | {action} | {why} |" in doc, key
