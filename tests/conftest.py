"""Session-wide test setup and fixtures. Shared helpers live in tests/helpers.py."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import compose  # noqa: E402

# Keep the default corpus and index caches of the test session out of the user's ~/.cache (subprocesses inherit it).
os.environ.setdefault("MEGAEFF_CACHE", tempfile.mkdtemp(prefix="megaeff-test-cache-"))


@pytest.fixture
def smoke_cfg():
    def make(run_dir, *overrides):
        return compose(["experiment=smoke", f"run_dir={run_dir}", "train.plot=false", "train.threads=1", *overrides])

    return make
