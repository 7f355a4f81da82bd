"""One way to find `conf/` and compose it into a typed, validated `Config` (the CLI, tests and tools use it)."""

import os
from pathlib import Path
from typing import Iterable, Optional, Type

from megaeff.config.choices import Choice, require_choice
from megaeff.config.schema import Config, register_configs, to_config
from megaeff.errors import MegaeffError


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


def check_choice_overrides(overrides: Iterable[str]) -> None:
    """Refuse a command-line value outside its choices with one ConfigError naming the field.

    Hydra would refuse it too, but with several lines of its own that do not start with `megaeff: error:`.
    Overrides that are not plain `key=value` assignments (sweeps, deletions, Hydra's flags) are left to Hydra.
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
        if override.is_delete() or override.is_sweep_override() or override.package is not None:
            continue
        choice = choice_type(override.key_or_group)
        value = override.value()
        if choice is not None and isinstance(value, str):
            require_choice(value, override.key_or_group, choice)


def compose_raw(overrides: Iterable[str] = (), config_dir: Optional[str] = None):
    """Compose conf/config.yaml with Hydra overrides into a DictConfig (checked against the schema, not validated)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    check_choice_overrides(overrides)
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or conf_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def compose(overrides: Iterable[str] = (), config_dir: Optional[str] = None) -> Config:
    """Compose, convert to the typed `Config` and run the section validators: what the CLI does before training."""
    return to_config(compose_raw(overrides, config_dir))
