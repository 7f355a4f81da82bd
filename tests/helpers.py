"""Helpers shared by the test modules (a plain module: `conftest` names clash between test directories)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
PYTHON = sys.executable


def compose(overrides=()):
    """Compose the real Hydra config (the same files users run) without the CLI."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from megaeff.config.schema import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(hydra_compose("config", overrides=list(overrides)))


def cli_env(**extra):
    """Environment for a megaeff subprocess: no inherited launcher variables, small thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    env.update(extra)
    return env
