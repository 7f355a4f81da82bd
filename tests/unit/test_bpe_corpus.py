"""megaeff/data/bpe.py (a byte-level BPE trained on a corpus's training documents) and the built-in corpora
tokenized with it (`data.tokenizer=hf`): their own cache, never mixed with the byte tokens."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from megaeff.config.choices import TokenizerKind
from megaeff.config.data import DataConfig
from megaeff.data.bpe import EOD_TOKEN, token_byte_lengths, train_bpe
from megaeff.data.builder import BuildContext, NamedCorpus, build_named_corpus
from megaeff.data.pydocs import load_topics
from megaeff.data.tokenizer import build_tokenizer, cache_tag
from megaeff.errors import ConfigError

# Multi-byte characters (2, 3 and 4 UTF-8 bytes): a per-token byte count taken from decoded text would miscount
# the tokens that split a character.
TEXT = "def naïve(x):\n    return x  # Größe 東京 🎭\n"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    topics = load_topics()
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe([topics[t] for t in ("if", "for", "while")] + [TEXT], 300, path)
    return path


def test_bpe_is_loadable_lossless_and_counts_bytes_exactly(bpe):
    tok = build_tokenizer("hf", str(bpe))
    specials = {t["content"]: t["id"] for t in json.loads(bpe.read_text())["added_tokens"]}
    assert tok.vocab_size == 300 and specials == {EOD_TOKEN: tok.eod_id}  # found as the end-of-document id
    ids = tok.encode(TEXT * 3)
    assert tok.decode(ids) == TEXT * 3
    lengths = token_byte_lengths(bpe)
    assert len(lengths) == tok.vocab_size and lengths[tok.eod_id] == 0
    # Exact, token by token: the bytes the ids stand for are the text's UTF-8 bytes.
    assert int(lengths[ids].sum()) == len((TEXT * 3).encode("utf-8"))
    assert max(lengths[ids]) > 1  # merges happened (a byte-only vocabulary would pass the sum trivially)


def test_named_corpus_with_bpe_has_its_own_cache(bpe, tmp_path):
    # A small corpus shaped like the built-in ones (the real ones take seconds to tokenize).
    docs = {f"doc{i}": f"{i}: " + TEXT * (20 + i) for i in range(4)}
    corpus = NamedCorpus("toy", "toy corpus", "docs", lambda: list(docs), lambda: docs, lambda tag: f"toy/docs_{tag}")

    def build(**tokenizer):
        dcfg = DataConfig(cache_dir=str(tmp_path), seq_len=16, valid_docs=["doc2"], **tokenizer)
        ctx = BuildContext(num_train_samples=8, seed=0, is_builder=True, barrier=lambda: None)
        return build_named_corpus(dcfg, ctx, corpus)

    byte_data = build()
    hf_data = build(tokenizer=TokenizerKind["hf"], tokenizer_path=str(bpe))
    byte_again = build()
    tok = hf_data.tokenizer
    assert "tokenizer hf (vocab 300)" in hf_data.description
    assert sorted(p.name for p in (tmp_path / "toy").glob("*.idx")) == [
        "docs_byte.idx",
        f"docs_{cache_tag('hf', str(bpe))}.idx",
    ]
    # The held-out document, in order and in BPE ids, then its end-of-document id.
    valid = np.concatenate(
        [hf_data.valid.tokens(0)] + [hf_data.valid.tokens(i)[1:] for i in range(1, len(hf_data.valid))]
    )
    expected = tok.encode(docs["doc2"]) + [tok.eod_id]
    assert list(valid) == expected[: len(valid)] and len(expected) - len(valid) < 16
    # The byte build after the BPE one still reads bytes: the caches are keyed by tokenizer.
    assert np.array_equal(byte_data.valid.tokens(0), byte_again.valid.tokens(0))
    assert list(byte_again.valid.tokens(0)) == list(docs["doc2"].encode("utf-8")[:17])


def test_cache_tag_follows_the_tokenizer_file(bpe, tmp_path):
    copy = tmp_path / "tokenizer.json"
    copy.write_bytes(bpe.read_bytes())
    assert cache_tag("hf", str(copy)) == cache_tag("hf", str(bpe))  # the content, not the path
    train_bpe([TEXT * 4], 270, copy)  # retrained in place: new content, new tag
    assert cache_tag("hf", str(copy)) != cache_tag("hf", str(bpe))


def test_missing_tokenizers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what an environment without the package raises
    with pytest.raises(ConfigError, match=r"pip install 'megaeff\[tokenizers\]'"):
        train_bpe([TEXT], 300, tmp_path / "tokenizer.json")
