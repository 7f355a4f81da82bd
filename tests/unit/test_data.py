"""Tokenizer, packed samples, the resumable global sample order, and the built-in corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megaeff.config.schema import DataConfig
from megaeff.data.builder import build_data, unigram_perplexity
from megaeff.data.corpus import clean_markdown, load_plays, split_plays
from megaeff.data.packed import IGNORE_INDEX, GlobalSampleOrder, PackedTokens, micro_batch_indices
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


# ----------------------------------------------------------------------------- packed samples
def test_samples_are_contiguous_windows():
    tokens = np.arange(100, 137, dtype=np.int32)  # 37 tokens
    ds = PackedTokens(tokens, seq_len=8, keep_tail=False)
    assert len(ds) == (37 - 1) // 8 == 4
    for i in range(len(ds)):
        inputs, labels = ds[i]
        assert inputs.dtype == labels.dtype == torch.int64
        assert inputs.tolist() == list(range(100 + 8 * i, 100 + 8 * i + 8))
        assert torch.equal(labels, inputs + 1)  # next-token labels
        assert (labels != IGNORE_INDEX).all()
    # Consecutive samples share the boundary token: the last label of i is the first input of i+1.
    assert int(ds[0][1][-1]) == int(ds[1][0][0])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds[-1]


@pytest.mark.parametrize("n,seq_len", [(37, 8), (33, 8), (9, 8), (2, 8), (50, 7)])
def test_keep_tail_covers_every_label_once(n, seq_len):
    tokens = np.arange(n, dtype=np.int32) * 3 + 1
    ds = PackedTokens(tokens, seq_len, keep_tail=True)
    assert len(ds) == math.ceil((n - 1) / seq_len)
    real = []
    for i in range(len(ds)):
        inputs, labels = ds[i]
        mask = labels != IGNORE_INDEX
        real.extend(labels[mask].tolist())
        # Padding is only at the end, and padded inputs are zeros.
        k = int(mask.sum())
        assert mask[:k].all() and not mask[k:].any()
        assert (inputs[k:] == 0).all()
        assert torch.equal(labels[:k], inputs[:k] + 3)
    assert len(real) == n - 1
    assert real == tokens[1:].tolist()


def test_drop_tail_vs_keep_tail():
    tokens = np.arange(20, dtype=np.int32)
    assert len(PackedTokens(tokens, 8, keep_tail=False)) == 2
    keep = PackedTokens(tokens, 8, keep_tail=True)
    assert len(keep) == 3
    inputs, labels = keep[2]
    assert labels.tolist() == [17, 18, 19] + [IGNORE_INDEX] * 5
    assert inputs.tolist()[:3] == [16, 17, 18]
    # An exact fit has no tail either way.
    exact = np.arange(17, dtype=np.int32)
    assert len(PackedTokens(exact, 8, keep_tail=True)) == len(PackedTokens(exact, 8, keep_tail=False)) == 2


def test_batch_stacks_samples():
    ds = PackedTokens(np.arange(50, dtype=np.int32), 4)
    inputs, labels = ds.batch([3, 0, 5])
    assert inputs.shape == labels.shape == (3, 4)
    assert torch.equal(inputs[0], ds[3][0]) and torch.equal(labels[2], ds[5][1])


def test_packed_rejects_2d():
    with pytest.raises(ValueError):
        PackedTokens(np.zeros((2, 3), dtype=np.int32), 2)


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
def test_default_corpus(default_data):
    plays = load_plays()
    assert len(plays) == 38
    assert list(plays) == sorted(plays)
    train, valid = split_plays(plays, ["hamlet", "the-tempest", "twelfth-night"])
    assert (len(train), len(valid)) == (35, 3)
    assert valid[0] == plays["hamlet"]
    d = default_data
    assert "35 train plays" in d.description and "3 valid plays" in d.description
    assert 10.0 < d.unigram_ppl < 60.0
    assert d.tokenizer.vocab_size == 257
    assert len(d.train) > 0 and len(d.valid) > 0
    # Markdown decoration is stripped.
    assert "**" not in plays["hamlet"]
    # Every validation token is scored once: label count = stream length - 1.
    valid_tokens = d.valid.tokens
    n_labels = sum(int((d.valid[i][1] != IGNORE_INDEX).sum()) for i in range(len(d.valid)))
    assert n_labels == len(valid_tokens) - 1
    # Documents end with the end-of-document id.
    assert int(valid_tokens[-1]) == d.tokenizer.eod_id
    assert int((valid_tokens == d.tokenizer.eod_id).sum()) == 3


def test_unknown_valid_doc():
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(valid_docs=["hamlet", "the-sopranos"]))
    assert exc.value.path == "data.valid_docs"
    assert "the-sopranos" in str(exc.value)
    with pytest.raises(DataError) as exc:
        split_plays({"a": "x"}, [])
    assert exc.value.path == "data.valid_docs"


def test_unknown_dataset_name():
    with pytest.raises(ConfigError) as exc:
        build_data(DataConfig(name="openwebtext"))
    assert exc.value.field == "data.name"


def test_clean_markdown():
    text = "# ACT I\n**HAMLET.** To be, _aside_, or not   \nsnake_case_name\n"
    assert clean_markdown(text) == "ACT I\nHAMLET. To be, aside, or not\nsnake_case_name\n"


def test_unigram_perplexity_by_hand():
    train = np.array([0, 0, 1], dtype=np.int32)
    # counts + 1 over a 3-symbol vocabulary: [3, 2, 1] / 6; every validation token but the first is predicted.
    valid = np.array([0, 1, 2, 0], dtype=np.int32)  # scored labels: 1, 2, 0
    expected = math.exp(-(math.log(2 / 6) + math.log(1 / 6) + math.log(3 / 6)) / 3)
    assert expected == pytest.approx(36 ** (1 / 3))
    assert unigram_perplexity(train, valid, vocab_size=3) == pytest.approx(expected, rel=1e-12)
    # A symbol never seen in training still gets add-one mass (vocab 4: counts [3, 2, 1, 1] / 7).
    expected4 = math.exp(-(math.log(2 / 7) + math.log(1 / 7) + math.log(1 / 7)) / 3)
    assert unigram_perplexity(train, np.array([5, 1, 2, 3]) % 4, vocab_size=4) == pytest.approx(expected4, rel=1e-12)


def test_unigram_baseline_matches_packed_labels(default_data):
    """The default bundle's baseline is scored on exactly the labels the evaluation loop scores."""
    d = default_data
    labels = torch.cat([d.valid[i][1] for i in range(len(d.valid))])
    labels = labels[labels != IGNORE_INDEX].numpy()
    counts = np.bincount(d.train.tokens, minlength=d.tokenizer.vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    assert d.unigram_ppl == pytest.approx(math.exp(-logp[labels].mean()), rel=1e-9)
