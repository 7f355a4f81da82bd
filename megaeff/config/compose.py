"""One way to find `conf/` and compose it into a typed, validated `Config` (the CLI, tests and tools use it)."""

import os
from pathlib import Path
from typing import Iterable, Optional, Type

from omegaconf import DictConfig

from megaeff.config.choices import Choice, require_choice
from megaeff.config.schema import Config, register_configs, to_config
from megaeff.errors import ConfigError, MegaeffError


def conf_dir() -> str:
    """The repo's `conf/` in a source checkout, else the copy packaged as `megaeff/_conf` at build time."""
    if os.environ.get("MEGAEFF_CONF_DIR"):
        return os.path.abspath(os.environ["MEGAEFF_CONF_DIR"])
    pkg = Path(__file__).resolve().parent.parent
    for candidate in (pkg.parent / "conf", pkg / "_conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise MegaeffError("cannot find the config directory (conf/); set MEGAEFF_CONF_DIR")


def choice_type(key: str) -> Optional[Type[Choice]]:
    """The Choice enum of a dotted schema key (`parallel.cp_impl` -> CpImpl), or None for any other key."""
    import typing
    from dataclasses import is_dataclass

    node: object = Config
    for part in key.split("."):
        if not is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node if isinstance(node, type) and issubclass(node, Choice) else None


def check_group_option(group: str, option: str, config_dir: str) -> None:
    """`experiment=smok`: one ConfigError naming the group's options when conf/<group>/<option>.yaml is missing.
    Hydra would refuse it in several lines of its own (or, for an optional group, not at all)."""
    root = Path(config_dir) / group
    if not root.is_dir() or option in ("null", "None") or (root / f"{option}.yaml").is_file():
        return
    options = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
    raise ConfigError(group, f"no such option {option!r} (no {root / option}.yaml); available: {', '.join(options)}")


def check_choice_overrides(overrides: Iterable[str], config_dir: Optional[str] = None) -> None:
    """Refuse a command-line value outside its choices, or a config group option that does not exist, with one
    ConfigError naming the field or group.

    Hydra would refuse it too, but with several lines of its own that do not start with `megaeff: error:`.
    Overrides that are not plain `key=value` assignments (deletions, Hydra's flags) are left to Hydra; a sweep's
    group options are checked one by one.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue  # malformed: Hydra (or the CLI's check_overrides) reports it
        if override.is_delete() or override.is_hydra_override():
            continue
        if override.package is None and "." not in override.key_or_group:
            values = override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]
            for option in values:
                if isinstance(option, str):
                    check_group_option(override.key_or_group, option, config_dir or conf_dir())
        if override.is_sweep_override() or override.package is not None:
            continue
        choice = choice_type(override.key_or_group)
        value = override.value()
        if choice is not None and isinstance(value, str):
            require_choice(value, override.key_or_group, choice)


def compose_raw(overrides: Iterable[str] = (), config_dir: Optional[str] = None):
    """Compose conf/config.yaml with Hydra overrides into a DictConfig (checked against the schema, not validated),
    with `optim.sources` recorded (megaeff/config/provenance.py)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from megaeff.config.provenance import record_sources

    overrides = list(overrides)
    check_choice_overrides(overrides, config_dir)
    register_configs()
    GlobalHydra.instance().clear()
    root = str(config_dir or conf_dir())
    with initialize_config_dir(config_dir=root, version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)  # the groups chosen, an experiment's `override /method:` included
    with open_dict(cfg):
        del cfg["hydra"]
    record_sources(cfg, overrides, choices, root)
    return cfg


def compose(overrides: Iterable[str] = (), config_dir: Optional[str] = None) -> Config:
    """Compose, convert to the typed `Config` and run the section validators: what the CLI does before training."""
    return to_config(compose_raw(overrides, config_dir))


def relax_preset_warmup(cfg: DictConfig, overrides: Iterable[str]) -> Optional[str]:
    """A preset's `optim.warmup_steps` (an experiment file's) longer than a shortened `train.steps` gives way to
    `optim.warmup_fraction` of the steps; returns the warning to print, None when nothing changed. A value set on
    the command line is the user's: validation still refuses it when it exceeds the steps."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    warmup, steps = cfg.optim.warmup_steps, cfg.train.steps
    if warmup is None or "optim.warmup_steps" in keys or not isinstance(steps, int) or warmup <= steps:
        return None
    cfg.optim.warmup_steps = None
    fraction = cfg.optim.warmup_fraction
    return (
        f"optim.warmup_steps={warmup} (from the config files, not the command line) exceeds train.steps={steps}: "
        f"warming up over optim.warmup_fraction={fraction} of the steps ({int(round(fraction * steps))}) instead; "
        "set optim.warmup_steps to choose"
    )
