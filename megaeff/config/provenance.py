"""Where each optimizer value of a run came from: the command line, an experiment preset, the method's own default
or the optimizer file.

Hydra sets the values. conf/config.yaml lists `optional method_optim@optim: ${method}` right after `optim`, so
conf/method_optim/<method>.yaml (the method's defaults, from tools/bench/lr_sweep.py) overrides the optimizer
file (conf/optim/<name>.yaml), an `experiment=` preset (listed last) overrides both, and the command line
overrides everything. This module replays that order on the same files to name each value's source, and stores
the result in `optim.sources` ({field: source}). Both ways of composing call it: `compose_raw` (Python: tools,
tests) and the CLI's task (one process, torchrun, the deepspeed launcher: every rank replays the same command
line). The trainer prints it and writes `<run_dir>/optim_sources.json`.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from megaeff.config.optim import OPTIM_SOURCES, OptimConfig

# Highest precedence first.
SOURCES = USER, EXPERIMENT, METHOD, OPTIM = OPTIM_SOURCES
# The defaults-list entry of the method's optimizer defaults, as Hydra records its choice.
METHOD_OPTIM_GROUP = "method_optim@optim"
# Always printed; any other field only when something other than the optimizer file set it.
CORE_FIELDS = ("lr", "betas", "weight_decay", "grad_clip", "warmup_steps", "warmup_fraction", "min_lr_ratio")
SOURCES_FILE = "optim_sources.json"


def optim_fields() -> List[str]:
    return [f.name for f in fields(OptimConfig) if f.name != "sources"]


def _override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~") if "=" in arg else ""


def _yaml_keys(path: Path, section: Optional[str]) -> set:
    """The keys a config file sets (under `section`, or at its top level), ignoring its defaults list."""
    from omegaconf import OmegaConf

    if not path.is_file():
        return set()
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    if section is not None:
        node = node.get(section) or {}
    return {k for k in node if k != "defaults"}


def optim_sources(overrides: Iterable[str], choices: Mapping[str, Any], config_dir: str) -> Dict[str, str]:
    """{optimizer field: source}, replaying the precedence Hydra applied (see the module docstring).

    `overrides`: the command line's (a sweep job's own); `choices`: Hydra's group choices of the run
    (`hydra.runtime.choices`), so that an experiment's `override /method: ...` is followed."""
    root = Path(config_dir)
    user = {k.split(".", 1)[1].split(".")[0] for k in map(_override_key, overrides) if k.startswith("optim.")}
    experiment = choices.get("experiment")
    from_experiment = _yaml_keys(root / "experiment" / f"{experiment}.yaml", "optim") if experiment else set()
    method = choices.get(METHOD_OPTIM_GROUP)
    from_method = _yaml_keys(root / "method_optim" / f"{method}.yaml", None) if method else set()
    out = {}
    for name in optim_fields():
        if name in user:
            out[name] = USER
        elif name in from_experiment:
            out[name] = EXPERIMENT
        elif name in from_method:
            out[name] = METHOD
        else:
            out[name] = OPTIM
    return out


def record_sources(cfg: Any, overrides: Iterable[str], choices: Mapping[str, Any], config_dir: str) -> None:
    """Write `optim_sources(...)` into the composed DictConfig's `optim.sources`."""
    cfg.optim.sources = optim_sources(overrides, choices, config_dir)


def describe_sources(o: OptimConfig) -> List[str]:
    """Log lines naming each optimizer value and where it came from; none when the config was not composed from
    conf/ (built in Python: nothing to attribute)."""
    if not o.sources:
        return []
    by_source: Dict[str, List[str]] = {}
    for name in optim_fields():
        source = o.sources.get(name, OPTIM)
        if source != OPTIM or name in CORE_FIELDS:
            value = getattr(o, name)
            by_source.setdefault(source, []).append(f"{name}={list(value) if isinstance(value, list) else value}")
    label = {USER: "user (command line)", OPTIM: f"optim default (conf/optim/{o.name}.yaml)"}
    return [
        "optimizer values by source (command line > experiment > method default > optim default): "
        + "; ".join(f"{label.get(s, s)}: {', '.join(by_source[s])}" for s in SOURCES if s in by_source)
    ]


def sources_record(o: OptimConfig) -> Dict[str, Dict[str, Any]]:
    """{field: {"value": ..., "source": ...}} for every optimizer field (JSON-ready)."""
    out = {}
    for name in optim_fields():
        value = getattr(o, name)
        value = list(value) if isinstance(value, list) else value
        out[name] = {"value": value.value if hasattr(value, "value") else value, "source": o.sources.get(name, OPTIM)}
    return out


def write_sources(o: OptimConfig, run_dir: Path) -> Optional[Path]:
    """`<run_dir>/optim_sources.json` when the sources were recorded; returns its path."""
    if not o.sources:
        return None
    path = Path(run_dir) / SOURCES_FILE
    path.write_text(json.dumps(sources_record(o), indent=1) + "\n")
    return path
