"""Helpers shared by the test modules (a plain module: `conftest` names clash between test directories)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
PYTHON = sys.executable


def compose(overrides=()):
    """Compose the real Hydra config (the same files users run) without the CLI: typed and validated."""
    from megaeff.config import compose as compose_config

    return compose_config(overrides, config_dir=str(CONF))


def cli_env(**extra):
    """Environment for a megaeff subprocess: no inherited launcher variables, small thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    env.update(extra)
    return env
