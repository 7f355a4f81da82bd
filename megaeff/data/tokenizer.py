"""Tokenizers. The byte-level default needs no download: token = UTF-8 byte, plus an end-of-document id.

Local Hugging Face (`tokenizer.json` or a `save_pretrained` directory) and SentencePiece (`.model`) tokenizers plug
in through the same small interface: `name`, `vocab_size`, `eod_id`, `encode(text) -> list[int]`,
`encode_array(text) -> int32 array`, `decode(ids) -> str`. Nothing is ever fetched from the hub.

`encode` adds no special tokens (no BOS/EOS from a post-processor): document boundaries are marked by the caller
with `eod_id` (`--append-eod` in preprocessing, the end-of-document token in training), so a tokenizer whose
template also appends EOS cannot double it. `decode` drops special tokens, as the byte tokenizer drops its EOD.
"""

from __future__ import annotations

import abc
import os
from typing import List, Optional, Sequence

import numpy as np

from megaeff.errors import ConfigError

PATH_FIELD = "data.tokenizer_path"
# A `tokenizers` file has no notion of EOS; these are the names the common model families give it.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
_EXTRA = "pip install 'megaeff[tokenizers]'"


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


class _LoadedTokenizer(abc.ABC):
    """Shared part of the file-backed tokenizers: the EOS check, and pickling by (kind, path) so that
    multiprocessing workers reload the file instead of receiving a serialized native object."""

    name: str
    vocab_size: int
    _eos: Optional[int]
    path: str

    @property
    def eod_id(self) -> int:
        if self._eos is None:
            raise ConfigError(
                PATH_FIELD,
                f"{self.path}: the tokenizer has no end-of-sequence token (looked for {', '.join(EOS_CANDIDATES)}), "
                "which is needed to mark document ends; add one or preprocess without --append-eod",
            )
        return self._eos

    @abc.abstractmethod
    def encode(self, text: str) -> List[int]:
        """Token ids of `text`, without special tokens."""

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def __reduce__(self):
        return build_tokenizer, (self.name, self.path)


class HFTokenizer(_LoadedTokenizer):
    name = "hf"

    def __init__(self, path: str):
        self.path = path
        try:
            if os.path.isdir(path):
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.vocab_size = len(self._tok)  # len() counts added tokens, .vocab_size does not
                self._eos = self._tok.eos_token_id
                self._encode = lambda text: self._tok.encode(text, add_special_tokens=False)
                self._decode = lambda ids: self._tok.decode(ids, skip_special_tokens=True)
            else:
                from tokenizers import Tokenizer

                self._tok = Tokenizer.from_file(path)
                self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
                self._eos = next((i for i in map(self._tok.token_to_id, EOS_CANDIDATES) if i is not None), None)
                self._encode = lambda text: self._tok.encode(text, add_special_tokens=False).ids
                self._decode = lambda ids: self._tok.decode(list(ids), skip_special_tokens=True)
        except ImportError as exc:
            raise ConfigError(PATH_FIELD, f"the 'hf' tokenizer needs {exc.name}: {_EXTRA}") from None
        except Exception as exc:  # the libraries raise assorted types for unreadable files
            raise ConfigError(PATH_FIELD, f"{path}: cannot load a Hugging Face tokenizer: {exc}") from None

    def encode(self, text: str) -> List[int]:
        return self._encode(text)  # both libraries return a fresh list

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])


class SentencePieceTokenizer(_LoadedTokenizer):
    name = "sentencepiece"

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            raise ConfigError(PATH_FIELD, f"{path}: a SentencePiece tokenizer is a .model file, not a directory")
        try:
            import sentencepiece
        except ImportError:
            raise ConfigError(PATH_FIELD, f"the 'sentencepiece' tokenizer needs sentencepiece: {_EXTRA}") from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as exc:
            raise ConfigError(PATH_FIELD, f"{path}: cannot load a SentencePiece model: {exc}") from None
        self.vocab_size = self._sp.get_piece_size()
        eos = self._sp.eos_id()
        self._eos = eos if eos >= 0 else None  # -1 means the model was trained without EOS

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


TOKENIZERS = {"byte": ByteTokenizer, "hf": HFTokenizer, "sentencepiece": SentencePieceTokenizer}


def build_tokenizer(kind: str, path: Optional[str] = None):
    """The tokenizer `kind` ("byte", "hf", "sentencepiece"); the file-backed kinds load `path` (local only)."""
    if kind not in TOKENIZERS:
        raise ConfigError("data.tokenizer", f"unknown tokenizer {kind!r}; available: {', '.join(TOKENIZERS)}")
    if kind == "byte":
        if path:
            raise ConfigError(PATH_FIELD, f"the byte tokenizer takes no path (got {path!r})")
        return ByteTokenizer()
    if not path:
        raise ConfigError(PATH_FIELD, f"the {kind!r} tokenizer needs a path to a local tokenizer")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(PATH_FIELD, f"{path}: no such file or directory")
    return TOKENIZERS[kind](path)


def cache_tag(kind: str, path: Optional[str] = None) -> str:
    """Names a tokenized corpus in the cache: "byte", or the kind and a hash of the tokenizer's files, so that
    corpora tokenized by different tokenizers (or a retrained one at the same path) never share cached tokens."""
    if kind == "byte":
        return "byte"
    import hashlib

    root = os.fspath(path)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs) if os.path.isdir(root) else [root]
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            digest.update(os.path.relpath(f, root).encode() + b"\0" + fh.read() + b"\0")
    return f"{kind}-{digest.hexdigest()[:12]}"
