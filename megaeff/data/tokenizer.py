"""Tokenizers. The byte-level default needs no download: token = UTF-8 byte, plus an end-of-document id.

Other tokenizers (Hugging Face, SentencePiece from a local path) plug in through the same small interface:
`encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eod_id`.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np


class ByteTokenizer:
    name = "byte"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised encode for large texts (the default corpus is a few MB)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


TOKENIZERS = {"byte": ByteTokenizer}


def build_tokenizer(name: str):
    from megaeff.errors import ConfigError

    try:
        return TOKENIZERS[name]()
    except KeyError:
        raise ConfigError("data.tokenizer", f"unknown tokenizer {name!r}; available: {', '.join(TOKENIZERS)}") from None
