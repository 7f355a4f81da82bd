"""Shared helpers: compose the real Hydra config (the same files users run) without the CLI."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# Keep the default corpus and index caches of the test session out of the user's ~/.cache (subprocesses inherit it).
os.environ.setdefault("MEGAEFF_CACHE", tempfile.mkdtemp(prefix="megaeff-test-cache-"))


def compose(overrides=()):
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


@pytest.fixture
def smoke_cfg():
    def make(run_dir, *overrides):
        return compose(["experiment=smoke", f"run_dir={run_dir}", "train.plot=false", "train.threads=1", *overrides])

    return make


PYTHON = sys.executable
