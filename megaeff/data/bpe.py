"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on a corpus's documents, for `data.tokenizer=hf`.

Byte-level: every UTF-8 byte is in the initial alphabet, so any text encodes without an unknown token, and each
ordinary token stands for a fixed byte string (its byte count is the length of its byte-level form, which is what
`token_byte_lengths` returns: bits per byte need it). `<|endoftext|>` is the one special token; megaeff marks
document ends with it (data/tokenizer.py looks it up as the end-of-document id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable

import numpy as np

from megaeff.errors import ConfigError

EOD_TOKEN = "<|endoftext|>"
_EXTRA = "pip install 'megaeff[tokenizers]'"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "data.tokenizer", f"training a BPE tokenizer needs the 'tokenizers' package: {_EXTRA}"
        ) from None
    return tokenizers


def train_bpe(docs: Iterable[str], vocab_size: int, path) -> Path:
    """Train on `docs` (the training documents only: held-out text must not shape the vocabulary) and write the
    `tokenizer.json` to `path`. `vocab_size` counts the 256 byte tokens and `<|endoftext|>`; the trainer stops
    earlier when the text has no more pairs to merge."""
    if vocab_size < 258:
        raise ConfigError(
            "vocab_size", f"a byte-level BPE needs at least 258 ids (256 bytes + merges + EOD), got {vocab_size}"
        )
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of `tokenizers`' ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def token_byte_lengths(path) -> np.ndarray:
    """UTF-8 bytes each id of a byte-level BPE `tokenizer.json` stands for (special tokens: 0), indexed by id."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    alphabet = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab = dict(spec["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    lengths = np.zeros(max([*vocab.values(), *specials.values()]) + 1, dtype=np.int64)
    for piece, i in vocab.items():
        if piece in specials:
            continue
        if any(c not in alphabet for c in piece):
            raise ConfigError("data.tokenizer_path", f"{path}: token {piece!r} is not byte-level; not a byte-level BPE")
        lengths[i] = len(piece)
    return lengths
