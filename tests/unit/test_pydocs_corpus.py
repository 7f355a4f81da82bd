"""The second built-in corpus, `data=pydocs` (megaeff/data/pydocs.py): the standard library's reference topics,
split into train / held-out topics like the Shakespeare corpus."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from megaeff.data.builder import BuildContext, build_data
from megaeff.data.pydocs import load_topics
from megaeff.errors import DataError
from tests.helpers import compose


def build(tmp_path, *overrides):
    cfg = compose(["data=pydocs", f"data.cache_dir={tmp_path}", *overrides])
    return cfg, build_data(cfg.data, BuildContext(num_train_samples=64, seed=0, is_builder=True, barrier=lambda: None))


def test_held_out_topics_are_exactly_the_validation_split(tmp_path):
    cfg, data = build(tmp_path)
    topics = load_topics()
    held_out = set(cfg.data.valid_docs)
    assert held_out and held_out < set(topics)
    # byte tokens plus one end-of-document token per topic
    valid_tokens = sum(len(topics[t].encode("utf-8")) + 1 for t in held_out)
    train_tokens = sum(len(v.encode("utf-8")) + 1 for t, v in topics.items() if t not in held_out)
    assert f"{len(topics) - len(held_out)} train topics / {train_tokens:,} tokens" in data.description
    assert f"{len(held_out)} valid topics / {valid_tokens:,} tokens" in data.description
    # The validation samples are the held-out text, in order: the first one starts the first held-out topic.
    first = sorted(held_out)[0]
    expected = np.frombuffer(topics[first].encode("utf-8"), dtype=np.uint8)[: cfg.data.seq_len + 1]
    assert np.array_equal(np.asarray(data.valid.tokens(0)[: len(expected)]), expected)
    assert 1.0 < data.unigram_ppl < 256.0  # a byte-level unigram over English text


def test_unknown_held_out_topic_names_the_field(tmp_path):
    with pytest.raises(DataError, match=r"data\.valid_docs.*unknown topics \['hamlet'\]"):
        build(tmp_path, "data.valid_docs=[hamlet]")


def test_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # what an interpreter without it raises
    with pytest.raises(DataError, match="pydoc_data.*data=pydocs needs"):
        build(tmp_path)
