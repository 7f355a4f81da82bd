"""Fixed-length GPT samples over an indexed (.bin/.idx) dataset, Megatron-style.

Three index arrays define the dataset, built once and cached next to the data:

- document index: the split's sequences, one permutation per epoch (seeded by (seed, epoch)), for as many
  epochs as the requested number of samples needs;
- sample index [num_samples + 1, 2]: where sample i starts, as (position in the document index, token offset);
  sample i covers seq_len + 1 tokens and shares its last token with sample i + 1, so every token is a label once;
- shuffle index: a permutation of the samples.

Samples are packed across document boundaries. With `reset_position_ids`, positions restart after every
end-of-document token; with `reset_attention_mask`, a segment id per document lets attention stay inside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from megaeff.errors import DataError

INDEX_CACHE_VERSION = 1


@dataclass(frozen=True)
class SampleOptions:
    seq_len: int
    eod_id: int
    reset_position_ids: bool = False
    reset_attention_mask: bool = False


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def make_cache_dir(path: Path) -> None:
    """mkdir -p with one DataError when it cannot be (a file in the way, no permission, read-only)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            path, f"cannot create this cache directory: {exc.strerror}; set data.cache_dir to a writable directory"
        ) from None


def cached_arrays(
    cache_dir: Path, description: Dict, build: Callable[[], Dict[str, np.ndarray]], *, is_builder: bool, barrier
) -> Dict[str, np.ndarray]:
    """Load the arrays cached under the hash of `description`, building them first if this rank is the builder.

    Every rank calls this (the barrier is collective). Files are written under temporary names and renamed, so
    a reader never sees a partial array; they are memory-mapped on load.
    """
    key = hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()
    desc_path = cache_dir / f"{key}-description.json"
    if is_builder and not desc_path.is_file():
        make_cache_dir(cache_dir)
        arrays = build()
        for name, array in arrays.items():
            _atomic_save(cache_dir / f"{key}-{name}.npy", np.asarray(array))
        # Written last: its presence means every array is complete.
        desc_path.write_text(json.dumps(dict(description, arrays=sorted(arrays)), indent=1))
    barrier()
    try:
        names = json.loads(desc_path.read_text())["arrays"]
        return {n: np.load(cache_dir / f"{key}-{n}.npy", mmap_mode="r", allow_pickle=False) for n in names}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(cache_dir, f"cannot load index cache {key}: {exc}") from None


def build_document_index(sequence_ids: np.ndarray, num_epochs: int, seed: int) -> np.ndarray:
    parts = [np.random.default_rng([seed, epoch]).permutation(sequence_ids) for epoch in range(num_epochs)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def build_sample_index(doc_lengths: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """Vectorised: sample i starts at global token position i * seq_len of the concatenated document index."""
    ends = np.cumsum(doc_lengths, dtype=np.int64)
    starts_tok = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    if num_samples and ends[-1] < starts_tok[-1] + 1:
        raise ValueError("document index too short for the requested samples")
    doc_pos = np.searchsorted(ends, starts_tok, side="right")
    doc_start = ends[doc_pos] - doc_lengths[doc_pos] if len(ends) else starts_tok
    return np.stack([doc_pos, starts_tok - doc_start], axis=1).astype(np.int64)


class GPTDataset:
    """`sequence_ids`: the sequences of the indexed dataset that belong to this split (e.g. one split's documents).

    `cache_dir`: where the index arrays live; `is_builder` / `barrier` let one rank build them while the others
    wait (pass `lambda: None` in a single process).
    """

    def __init__(
        self,
        indexed,
        sequence_ids: np.ndarray,
        num_samples: int,
        seed: int,
        options: SampleOptions,
        *,
        name: str,
        cache_dir: Path,
        shuffle: bool = True,
        is_builder: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ):
        self.indexed = indexed
        self.options = options
        self.name = name
        sequence_ids = np.asarray(sequence_ids, dtype=np.int64)
        lengths = np.asarray(indexed.sequence_lengths, dtype=np.int64)
        tokens_per_epoch = int(lengths[sequence_ids].sum()) if len(sequence_ids) else 0
        if tokens_per_epoch <= options.seq_len:
            raise DataError(
                name, f"split has {tokens_per_epoch} tokens, fewer than one sample of {options.seq_len + 1}"
            )
        if num_samples <= 0:
            raise ValueError("num_samples must be positive")
        # Samples overlap by one token, so N samples need N * seq_len + 1 tokens.
        num_epochs = -(-(num_samples * options.seq_len + 1) // tokens_per_epoch)
        self.description = {
            "version": INDEX_CACHE_VERSION,
            "name": name,
            "num_sequences_in_file": int(len(lengths)),
            "num_tokens_in_file": int(lengths.sum()),
            "split_hash": hashlib.sha256(sequence_ids.tobytes()).hexdigest()[:16],
            # The arrays depend on every sequence length and document boundary: a re-preprocessed prefix (same
            # counts, other order) must not reuse them. Datasets without a file (tests' in-memory ones) have none.
            "idx_sha256": indexed.content_hash() if hasattr(indexed, "content_hash") else None,
            "num_samples": int(num_samples),
            "num_epochs": int(num_epochs),
            "seq_len": options.seq_len,
            "seed": int(seed),
            "shuffle": bool(shuffle),
        }

        def build():
            doc_index = (
                build_document_index(sequence_ids, num_epochs, seed) if shuffle else np.tile(sequence_ids, num_epochs)
            )
            sample_index = build_sample_index(lengths[doc_index], options.seq_len, num_samples)
            rng = np.random.default_rng([seed, 1 << 20])
            shuffle_index = rng.permutation(num_samples) if shuffle else np.arange(num_samples)
            return {"document_index": doc_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

        arrays = cached_arrays(Path(cache_dir), self.description, build, is_builder=is_builder, barrier=barrier)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        if len(self.shuffle_index) != num_samples or len(self.sample_index) != num_samples + 1:
            raise DataError(cache_dir, "sample index cache has the wrong size; delete it to rebuild")
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, i: int) -> np.ndarray:
        """The seq_len + 1 tokens of sample i (after shuffling)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        j = int(self.shuffle_index[i])
        (d0, off0), (d1, off1) = self.sample_index[j], self.sample_index[j + 1]
        if d0 == d1:
            return np.asarray(self.indexed.get(int(self.document_index[d0]), int(off0), int(off1 - off0 + 1)))
        parts = [self.indexed.get(int(self.document_index[d0]), int(off0))]
        parts += [self.indexed[int(self.document_index[d])] for d in range(d0 + 1, d1)]
        parts.append(self.indexed.get(int(self.document_index[d1]), 0, int(off1) + 1))
        return np.concatenate(parts)

    def sample(self, i: int) -> Dict[str, torch.Tensor]:
        return make_sample(self.tokens(i), self.options)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        s = self.sample(i)
        return s["inputs"], s["labels"]

    def batch(self, indices) -> Dict[str, torch.Tensor]:
        return collate([self.sample(int(i)) for i in indices])


def make_sample(tokens: np.ndarray, options: SampleOptions) -> Dict[str, torch.Tensor]:
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    inputs, labels = t[:-1], t[1:]
    out = {"inputs": inputs, "labels": labels}
    if options.reset_position_ids or options.reset_attention_mask:
        # A new document starts right after each end-of-document token of the inputs.
        starts = torch.zeros_like(inputs)
        starts[1:] = (inputs[:-1] == options.eod_id).long()
        segment = torch.cumsum(starts, 0)
        if options.reset_position_ids:
            idx = torch.arange(len(inputs))
            first = torch.zeros_like(inputs)
            first[starts.bool()] = idx[starts.bool()]
            out["positions"] = idx - torch.cummax(first, 0).values
        if options.reset_attention_mask:
            out["segment_ids"] = segment
    return out


def collate(samples) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def split_documents(num_documents: int, ratios: str, name: str) -> Tuple[Tuple[int, int], ...]:
    """Megatron's `--split 969,30,1`: document ranges for train/valid/test proportional to the weights."""
    try:
        weights = [float(x) for x in ratios.replace("/", ",").split(",")]
    except ValueError:
        raise DataError(name, f"data.split {ratios!r} is not a comma-separated list of numbers") from None
    weights += [0.0] * (3 - len(weights))
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(name, f"data.split {ratios!r} needs up to three non-negative weights with a positive sum")
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * num_documents)))
    bounds[-1] = num_documents
    bounds = [min(b, num_documents) for b in bounds]
    return tuple((bounds[i], bounds[i + 1]) for i in range(3))


def sequences_of_documents(document_indices: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Sequence ids of documents [lo, hi) of an indexed dataset."""
    return np.arange(int(document_indices[lo]), int(document_indices[hi]), dtype=np.int64)


def default_cache_dir(prefix: str, cache_dir: Optional[str]) -> Path:
    if cache_dir:
        return Path(cache_dir)
    p = Path(prefix)
    return p.parent / f"{p.name}_cache"
