"""build_tokenizer: the byte tokenizer and local Hugging Face / SentencePiece tokenizers trained here, in the test."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from megaeff.data.corpus import load_plays
from megaeff.data.tokenizer import ByteTokenizer, build_tokenizer
from megaeff.errors import ConfigError

SAMPLES = [
    "To be, or not to be, that is the question:",
    "Ça va? Größe — naïve 東京 🎭\nline two",
    "  leading spaces and\ttabs\n\n",
    "",
]


@pytest.fixture(scope="module")
def hamlet():
    return load_plays()["hamlet"][:20000]


def train_bpe(text: str, special_tokens=("<eos>",)):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(special_tokens),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    return tok


@pytest.fixture(scope="module")
def bpe(hamlet, tmp_path_factory):
    tok = train_bpe(hamlet)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return tok, path


def train_sentencepiece(text: str, tmp_path, **extra):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    prefix = tmp_path / "sp"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=200, model_type="bpe", minloglevel=2, **extra
    )
    return sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model"), f"{prefix}.model"


def test_byte_round_trip():
    tok = build_tokenizer("byte")  # the one-argument form existing callers use
    assert isinstance(tok, ByteTokenizer) and tok.name == "byte"
    assert (tok.vocab_size, tok.eod_id) == (257, 256)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.encode_array(text).tolist() == ids
        assert tok.decode(ids + [tok.eod_id]) == text
    assert pickle.loads(pickle.dumps(tok)).encode("é") == [0xC3, 0xA9]


def test_byte_takes_no_path(tmp_path):
    with pytest.raises(ConfigError, match="takes no path") as exc:
        build_tokenizer("byte", str(tmp_path))
    assert exc.value.field == "data.tokenizer_path"


def test_hf_tokenizer_json(bpe):
    lib, path = bpe
    tok = build_tokenizer("hf", str(path))
    assert tok.name == "hf"
    assert tok.vocab_size == lib.get_vocab_size(with_added_tokens=True) == 300
    assert tok.eod_id == lib.token_to_id("<eos>")
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == lib.encode(text).ids
        assert tok.encode_array(text).dtype == np.int32 and tok.encode_array(text).tolist() == ids
        # Byte-level BPE is lossless, and decode drops the EOD like the byte tokenizer does.
        assert tok.decode(ids + [tok.eod_id]) == text
    assert len(tok.encode(SAMPLES[0])) < len(SAMPLES[0])  # it really merged something
    # Workers receive the tokenizer pickled by path and reload it.
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(SAMPLES[1]) == tok.encode(SAMPLES[1]) and clone.eod_id == tok.eod_id


def test_hf_encode_adds_no_special_tokens(hamlet, tmp_path):
    """A post-processor that appends EOS must not double the EOD that preprocessing appends itself."""
    from tokenizers import processors

    lib = train_bpe(hamlet)
    eos = lib.token_to_id("<eos>")
    lib.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", eos)])
    lib.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer("hf", str(tmp_path / "tokenizer.json"))
    assert lib.encode(SAMPLES[0]).ids[-1] == eos
    assert tok.encode(SAMPLES[0]) == lib.encode(SAMPLES[0]).ids[:-1]


def test_hf_transformers_directory(bpe, tmp_path):
    from transformers import PreTrainedTokenizerFast

    lib, path = bpe
    fast = PreTrainedTokenizerFast(tokenizer_object=lib, eos_token="<eos>")
    fast.add_tokens(["<extra_0>"])
    fast.save_pretrained(str(tmp_path / "tok"))
    tok = build_tokenizer("hf", str(tmp_path / "tok"))
    # Added tokens count: the model's embedding must cover them.
    assert tok.vocab_size == len(fast) == 301
    assert tok.eod_id == fast.eos_token_id == lib.token_to_id("<eos>")
    from_json = build_tokenizer("hf", str(path))
    for text in SAMPLES:
        assert tok.encode(text) == fast.encode(text, add_special_tokens=False) == from_json.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a <extra_0> b") == fast.encode("a <extra_0> b", add_special_tokens=False)
    assert 300 in tok.encode("a <extra_0> b")


def test_hf_without_eos_errors_only_when_eod_is_needed(hamlet, tmp_path):
    train_bpe(hamlet, special_tokens=()).save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer("hf", str(tmp_path / "tokenizer.json"))
    assert tok.decode(tok.encode(SAMPLES[0])) == SAMPLES[0]  # usable without EOD
    with pytest.raises(ConfigError, match="no end-of-sequence token") as exc:
        _ = tok.eod_id
    assert str(tmp_path / "tokenizer.json") in str(exc.value)


def test_sentencepiece(hamlet, tmp_path):
    sp, path = train_sentencepiece(hamlet, tmp_path)
    tok = build_tokenizer("sentencepiece", path)
    assert tok.name == "sentencepiece"
    assert tok.vocab_size == sp.get_piece_size() == 200
    assert tok.eod_id == sp.eos_id() >= 0
    for text in SAMPLES:
        assert tok.encode(text) == sp.encode(text)
        assert tok.encode_array(text).tolist() == sp.encode(text)
    text = "To be, or not to be"
    assert tok.decode(tok.encode(text) + [tok.eod_id]) == sp.decode(sp.encode(text)) == text
    assert pickle.loads(pickle.dumps(tok)).encode(text) == sp.encode(text)


def test_sentencepiece_without_eos(hamlet, tmp_path):
    _, path = train_sentencepiece(hamlet, tmp_path, eos_id=-1)
    tok = build_tokenizer("sentencepiece", path)
    assert tok.encode("to be")
    with pytest.raises(ConfigError, match="no end-of-sequence token"):
        _ = tok.eod_id


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_missing_or_bad_path(kind, tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(ConfigError, match="no such file or directory") as exc:
        build_tokenizer(kind, str(missing))
    assert exc.value.field == "data.tokenizer_path" and str(missing) in str(exc.value)
    with pytest.raises(ConfigError, match="needs a path"):
        build_tokenizer(kind)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a tokenizer")
    with pytest.raises(ConfigError, match="cannot load") as exc:
        build_tokenizer(kind, str(garbage))
    assert str(garbage) in str(exc.value)


def test_unknown_kind():
    with pytest.raises(ConfigError) as exc:
        build_tokenizer("wordpiece", "x")
    assert exc.value.field == "data.tokenizer"
    assert "byte, hf, sentencepiece" in str(exc.value)
