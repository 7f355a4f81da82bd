"""GPT samples over indexed datasets: tiling, epochs, caching, per-document masks, splits and blending."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from megaeff.config.schema import MethodConfig, ModelConfig
from megaeff.data.blend import BlendedDataset, blending_indices, parse_blend
from megaeff.data.gpt_dataset import GPTDataset, SampleOptions, make_sample, sequences_of_documents, split_documents
from megaeff.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megaeff.errors import DataError
from megaeff.layers.attention import MathAttention, SdpaAttention
from megaeff.models.init import materialize
from megaeff.models.llama import build_llama

EOD = 0


def write_docs(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(np.asarray(d))
    b.finalize(str(prefix) + ".idx")
    return IndexedDataset(str(prefix))


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 500, size=int(n)), EOD) for n in rng.integers(3, 40, size=25)]
    return write_docs(tmp_path / "c", docs), docs


def make(ds, n, tmp_path, seq_len=8, seed=1, shuffle=True, **kw):
    opts = SampleOptions(seq_len, EOD, **kw)
    return GPTDataset(ds, np.arange(len(ds)), n, seed, opts, name="t", cache_dir=tmp_path / "cache", shuffle=shuffle)


def test_samples_tile_the_document_stream(corpus, tmp_path):
    ds, docs = corpus
    total = sum(len(d) for d in docs)
    n = (3 * total) // 8  # about three epochs
    g = make(ds, n, tmp_path, shuffle=False)
    stream = np.concatenate([ds[int(i)] for i in g.document_index])
    for i in range(n):
        assert np.array_equal(g.tokens(i), stream[i * 8 : i * 8 + 9])
        x, y = g[i]
        assert torch.equal(y[:-1], x[1:])  # labels are inputs shifted by one
    # Each epoch of the document index is a permutation of all documents, and epochs differ.
    epochs = np.asarray(g.document_index).reshape(-1, len(docs))
    assert g.description["num_epochs"] == len(epochs) == 3
    g2 = make(ds, n, tmp_path, seed=1)
    ep2 = np.asarray(g2.document_index).reshape(-1, len(docs))
    assert all(sorted(e) == list(range(len(docs))) for e in ep2)
    assert len({tuple(e) for e in ep2}) == len(ep2)


def test_shuffle_is_a_deterministic_permutation(corpus, tmp_path):
    ds, _ = corpus
    a, b = make(ds, 40, tmp_path, seed=5), make(ds, 40, tmp_path / "other", seed=5)
    c = make(ds, 40, tmp_path, seed=6)
    assert sorted(np.asarray(a.shuffle_index)) == list(range(40))
    assert all(np.array_equal(a.tokens(i), b.tokens(i)) for i in range(40))
    assert any(not np.array_equal(a.tokens(i), c.tokens(i)) for i in range(40))


def test_index_cache_is_built_once_and_keyed_by_parameters(corpus, tmp_path, monkeypatch):
    ds, _ = corpus
    first = make(ds, 30, tmp_path)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 4  # three arrays + description
    import megaeff.data.gpt_dataset as gd

    monkeypatch.setattr(gd, "build_document_index", lambda *a: pytest.fail("rebuilt a cached index"))
    again = make(ds, 30, tmp_path)
    assert all(np.array_equal(first.tokens(i), again.tokens(i)) for i in range(30))
    monkeypatch.undo()
    make(ds, 30, tmp_path, seq_len=4)  # other parameters: another cache entry
    assert len(list((tmp_path / "cache").iterdir())) == 8


def test_one_rank_builds_while_the_others_wait(corpus, tmp_path):
    ds, _ = corpus
    barrier = threading.Barrier(2)
    results = {}

    def rank(r):
        results[r] = GPTDataset(
            ds,
            np.arange(len(ds)),
            30,
            0,
            SampleOptions(8, EOD),
            name="t",
            cache_dir=tmp_path / "shared",
            is_builder=(r == 0),
            barrier=barrier.wait,
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(results) == {0, 1}
    assert all(np.array_equal(results[0].tokens(i), results[1].tokens(i)) for i in range(30))


def test_too_small_split_is_a_clear_error(tmp_path):
    ds = write_docs(tmp_path / "tiny", [[1, 2, EOD]])
    with pytest.raises(DataError, match="fewer than one sample"):
        make(ds, 1, tmp_path)


def test_position_and_segment_resets():
    tokens = np.array([5, 6, EOD, 7, 8, 9, EOD, EOD, 3])
    s = make_sample(tokens, SampleOptions(8, EOD, reset_position_ids=True, reset_attention_mask=True))
    assert s["inputs"].tolist() == [5, 6, EOD, 7, 8, 9, EOD, EOD]
    assert s["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert s["segment_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    plain = make_sample(tokens, SampleOptions(8, EOD))
    assert set(plain) == {"inputs", "labels"}


@pytest.mark.parametrize("backend", [SdpaAttention(), MathAttention()], ids=["sdpa", "math"])
def test_per_document_attention_equals_running_documents_alone(backend):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=50, max_seq_len=64)
    model = materialize(build_llama(cfg, MethodConfig()), torch.device("cpu"), seed=3, std=0.02).double()
    model.attention_backend = backend
    docs = [[4, 9, 11, EOD], [7, 3, 3, 8, 2, EOD], [5, 6]]
    packed = np.concatenate([np.asarray(d) for d in docs] + [[1]])
    s = make_sample(packed, SampleOptions(12, EOD, reset_position_ids=True, reset_attention_mask=True))
    together = model(s["inputs"][None], positions=s["positions"][None], segment_ids=s["segment_ids"][None])[0]
    start = 0
    for d in docs:
        alone = model(torch.tensor(d)[None])[0]
        torch.testing.assert_close(together[start : start + len(d)], alone, rtol=1e-10, atol=1e-10)
        start += len(d)
    # Without the masks, later documents do see earlier ones.
    mixed = model(s["inputs"][None])[0]
    assert not torch.allclose(mixed[4:10], together[4:10])


def test_split_documents_ratios():
    assert split_documents(1000, "969,30,1", "x") == ((0, 969), (969, 999), (999, 1000))
    assert split_documents(10, "8,2", "x") == ((0, 8), (8, 10), (10, 10))
    assert split_documents(3, "1,1,1", "x") == ((0, 1), (1, 2), (2, 3))
    for bad in ("a,b", "-1,2", "0,0,0", "1,2,3,4"):
        with pytest.raises(DataError, match="data.split"):
            split_documents(10, bad, "x")


def test_sequences_of_documents():
    doc_idx = np.array([0, 2, 3, 7])  # three documents of 2, 1 and 4 sequences
    assert sequences_of_documents(doc_idx, 1, 3).tolist() == [2, 3, 4, 5, 6]


def test_parse_blend_megatron_syntax():
    assert parse_blend(["0.3", "a", "0.7", "b"], "f") == ([pytest.approx(0.3), pytest.approx(0.7)], ["a", "b"])
    assert parse_blend(["1 a 3 b"], "f") == ([0.25, 0.75], ["a", "b"])
    assert parse_blend(["/data/x_text_document"], "f") == ([1.0], ["/data/x_text_document"])
    for bad, msg in (
        [["0.3", "a", "0.7"], "odd number"],
        [["x", "a", "1", "b"], "not a number"],
        [["-1", "a", "2", "b"], "positive"],
        [["nan", "a", "1", "b"], "positive"],
        [[], "no dataset"],
    ):
        with pytest.raises(DataError, match=msg) as exc:
            parse_blend(bad, "data.paths")
        assert exc.value.path == "data.paths"


def test_blending_tracks_weights_at_every_prefix():
    weights = [0.5, 0.3, 0.2]
    which, within = blending_indices(weights, 1000)
    counts = np.zeros(3)
    for i, k in enumerate(which):
        assert within[i] == counts[k]  # samples of each dataset are taken in order
        counts[k] += 1
        assert np.all(np.abs(counts - np.array(weights) * (i + 1)) <= 1.0 + 1e-9)
    assert counts.tolist() == [500, 300, 200]
    assert np.array_equal(blending_indices(weights, 1000)[0], which)  # deterministic


def test_blended_dataset_reads_from_its_parts(corpus, tmp_path):
    ds, _ = corpus
    a, b = make(ds, 20, tmp_path, seed=1), make(ds, 20, tmp_path, seed=2)
    which, within = blending_indices([0.75, 0.25], 24)
    blend = BlendedDataset([a, b], which, within)
    for i in range(24):
        src = (a, b)[int(which[i])]
        assert torch.equal(blend.batch([i])["inputs"][0], src.sample(int(within[i]))["inputs"])
    with pytest.raises(ValueError, match="needs"):
        BlendedDataset([a, make(ds, 2, tmp_path, seed=3)], *blending_indices([0.5, 0.5], 24))
