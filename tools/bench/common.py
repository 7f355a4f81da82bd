"""Shared by the benchmark scripts: compose a typed megaeff config from Hydra overrides, as the CLI does."""

from __future__ import annotations

from typing import Iterable

from megaeff.cli.train import conf_dir
from megaeff.config.schema import Config, register_configs, to_config


def compose(overrides: Iterable[str]) -> Config:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return to_config(hydra_compose("config", overrides=list(overrides)))
