"""Session-wide test setup and fixtures. Shared helpers live in tests/helpers.py.

tests/ is a package tree (an __init__.py in every test directory), so pytest's default import mode puts the
repository root on sys.path and test modules import helpers as `tests.helpers`, `tests.distributed.harness`;
spawned ranks (tests/distributed/harness.py) get the same sys.path and find the test modules by those names.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.helpers import compose

# Keep the default corpus and index caches of the test session out of the user's ~/.cache (subprocesses inherit it).
os.environ.setdefault("MEGAEFF_CACHE", tempfile.mkdtemp(prefix="megaeff-test-cache-"))


@pytest.fixture
def smoke_cfg():
    def make(run_dir, *overrides):
        return compose(["experiment=smoke", f"run_dir={run_dir}", "train.plot=false", "train.threads=1", *overrides])

    return make


@pytest.fixture(scope="session")
def rank_pools():
    """The session's multi-rank pools (tests/distributed/harness.py), spawned on first use, closed at the end."""
    from tests.distributed.harness import RankPools

    pools = RankPools()
    yield pools
    pools.close()
