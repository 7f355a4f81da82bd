"""Tokenizer, the resumable global sample order, and the built-in corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megaeff.config.schema import DataConfig
from megaeff.data.builder import BuildContext, build_data, unigram_perplexity
from megaeff.data.corpus import clean_markdown, load_plays
from megaeff.data.sampler import GlobalSampleOrder, micro_batch_indices
from megaeff.data.tokenizer import ByteTokenizer, build_tokenizer
from megaeff.errors import ConfigError, DataError


# ----------------------------------------------------------------------------- tokenizer
def test_byte_tokenizer_round_trip_non_ascii():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    text = "Ça va? Größe — naïve 東京 🎭\nline two"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    arr = tok.encode_array(text)
    assert arr.dtype == np.int32 and arr.tolist() == ids
    # The end-of-document id is outside the byte range and is dropped by decode.
    assert tok.eod_id == 256 and tok.vocab_size == 257
    assert tok.decode(ids + [tok.eod_id] + ids) == text + text


def test_unknown_tokenizer():
    with pytest.raises(ConfigError) as exc:
        build_tokenizer("sentencepiece-nope")
    assert exc.value.field == "data.tokenizer"


# ----------------------------------------------------------------------------- global sample order
def test_each_epoch_is_a_permutation():
    n = 53
    order = GlobalSampleOrder(n, seed=7)
    epochs = [order.slice(e * n, n) for e in range(4)]
    for ep in epochs:
        assert sorted(ep) == list(range(n))
    assert len({tuple(ep) for ep in epochs}) == 4  # different epochs differ
    assert epochs[0] != list(range(n))  # actually shuffled


def test_order_is_deterministic_from_seed():
    a = GlobalSampleOrder(40, seed=3)
    b = GlobalSampleOrder(40, seed=3)
    c = GlobalSampleOrder(40, seed=4)
    # Random access order does not matter (the permutation cache is bounded).
    ks = [205, 3, 119, 41, 0, 80, 206, 1]
    assert [a[k] for k in ks] == [b[k] for k in reversed(ks)][::-1]
    assert a.slice(0, 200) == b.slice(0, 200)
    assert a.slice(0, 40) != c.slice(0, 40)


def test_unshuffled_order_and_empty():
    order = GlobalSampleOrder(5, seed=0, shuffle=False)
    assert order.slice(3, 6) == [3, 4, 0, 1, 2, 3]
    with pytest.raises(ValueError):
        GlobalSampleOrder(0, seed=0)


def test_micro_batches_independent_of_dp():
    """The set of samples in step s is the same global slice whatever the dp degree (resume on another DP)."""
    order = GlobalSampleOrder(97, seed=11)
    global_batch = 16
    for step in range(8):  # crosses epoch boundaries (16 * 8 > 97)
        consumed = step * global_batch
        expected = order.slice(consumed, global_batch)
        for micro, dp, accum in [(16, 1, 1), (4, 1, 4), (8, 2, 1), (2, 2, 4), (4, 4, 1), (1, 4, 4), (2, 8, 1)]:
            assert micro * dp * accum == global_batch
            union = []
            for rank in range(dp):
                mbs = micro_batch_indices(order, consumed, micro, dp, rank, accum)
                assert len(mbs) == accum and all(len(mb) == micro for mb in mbs)
                for mb in mbs:
                    union.extend(mb)
            assert sorted(union) == sorted(expected), (step, micro, dp, accum)


def test_micro_batch_layout_is_megatron():
    order = GlobalSampleOrder(1000, seed=0, shuffle=False)
    # accum slice a = [consumed + a*micro*dp, ...); rank r takes the r-th micro-sized piece.
    assert micro_batch_indices(order, 100, 2, 3, 1, 2) == [[102, 103], [108, 109]]
    assert micro_batch_indices(order, 0, 2, 3, 0, 1) == [[0, 1]]


# ----------------------------------------------------------------------------- corpus
def small_ctx():
    return BuildContext(num_train_samples=64, seed=0, is_builder=True, barrier=lambda: None)


def test_default_corpus(default_data):
    plays = load_plays()
    assert len(plays) == 38
    assert list(plays) == sorted(plays)
    assert "**" not in plays["hamlet"]  # Markdown decoration is stripped
    d = default_data
    assert "35 train plays" in d.description and "3 valid plays" in d.description
    assert 10.0 < d.unigram_ppl < 60.0
    assert d.tokenizer.vocab_size == 257
    assert len(d.train) == 64
    # Validation is one unshuffled pass: consecutive samples tile the held-out plays (hamlet comes first).
    first = d.valid.tokens(0)
    assert bytes(first[:6].astype(np.uint8)).decode() == "Hamlet"
    assert int(d.valid.tokens(0)[-1]) == int(d.valid.tokens(1)[0])
    n_tokens = int(d.valid.indexed.sequence_lengths[d.valid.document_index].sum())
    assert len(d.valid) == (n_tokens - 1) // 256
    # The samples tile the three held-out plays, each followed by the end-of-document id, in order.
    covered = np.concatenate(
        [d.valid.tokens(i)[:-1] for i in range(len(d.valid))] + [d.valid.tokens(len(d.valid) - 1)[-1:]]
    )
    tok = d.tokenizer
    stream = np.concatenate(
        [np.append(tok.encode_array(plays[n]), tok.eod_id) for n in ["hamlet", "the-tempest", "twelfth-night"]]
    )
    assert np.array_equal(covered, stream[: len(covered)])
    assert len(stream) - len(covered) < 256  # only the last partial sample is left out


def test_unknown_valid_doc():
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(valid_docs=["hamlet", "the-sopranos"]), small_ctx())
    assert exc.value.path == "data.valid_docs"
    assert "the-sopranos" in str(exc.value)
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(valid_docs=[]), small_ctx())
    assert exc.value.path == "data.valid_docs"


def test_unknown_dataset_name():
    with pytest.raises(ConfigError) as exc:
        build_data(DataConfig(name="openwebtext"), small_ctx())
    assert exc.value.field == "data.name"


def test_clean_markdown():
    text = "# ACT I\n**HAMLET.** To be, _aside_, or not   \nsnake_case_name\n"
    assert clean_markdown(text) == "ACT I\nHAMLET. To be, aside, or not\nsnake_case_name\n"


def test_unigram_perplexity_by_hand():
    train = np.array([0, 0, 1], dtype=np.int32)
    # counts + 1 over a 3-symbol vocabulary: [3, 2, 1] / 6, scored on the validation labels.
    valid = np.array([1, 2, 0], dtype=np.int32)
    expected = math.exp(-(math.log(2 / 6) + math.log(1 / 6) + math.log(3 / 6)) / 3)
    assert expected == pytest.approx(36 ** (1 / 3))
    assert unigram_perplexity(train, valid, vocab_size=3) == pytest.approx(expected, rel=1e-12)
    # A symbol never seen in training still gets add-one mass (vocab 4: counts [3, 2, 1, 1] / 7).
    expected4 = math.exp(-(math.log(2 / 7) + math.log(1 / 7) + math.log(1 / 7)) / 3)
    assert unigram_perplexity(train, np.array([1, 2, 3]), vocab_size=4) == pytest.approx(expected4, rel=1e-12)


def test_unigram_baseline_matches_evaluated_labels(default_data):
    """The default bundle's baseline is scored on exactly the labels the evaluation loop scores."""
    d = default_data
    labels = np.concatenate([d.valid.tokens(i)[1:] for i in range(len(d.valid))]).astype(np.int64)
    train_tokens = np.concatenate([d.train.indexed[int(i)] for i in np.unique(d.train.document_index)])
    counts = np.bincount(train_tokens, minlength=d.tokenizer.vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    assert d.unigram_ppl == pytest.approx(math.exp(-logp[labels].mean()), rel=1e-9)
