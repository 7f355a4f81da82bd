"""Fixtures of the unit tests (helpers such as `compose` live in tests/helpers.py)."""

from __future__ import annotations

from typing import Sequence

import pytest

from tests.helpers import compose, compose_raw


@pytest.fixture
def compose_cfg():
    """`compose_cfg(overrides)` -> typed Config; `compose_cfg(overrides, raw=True)` -> the DictConfig."""

    def _compose(overrides: Sequence[str] = (), raw: bool = False):
        return compose_raw(overrides) if raw else compose(overrides)

    return _compose


@pytest.fixture(scope="session")
def default_data():
    """The built-in Shakespeare corpus (about a second to build), shared by the data tests."""
    from megaeff.config.schema import DataConfig
    from megaeff.data.builder import BuildContext, build_data

    return build_data(DataConfig(), BuildContext(num_train_samples=64, seed=0, is_builder=True, barrier=lambda: None))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module (tiny shapes run faster and steadier that way on a shared machine)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
