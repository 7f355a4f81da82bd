"""Weighted blending of several datasets (Megatron's `--data-path 0.3 a 0.7 b`).

Sample i of the blend comes from the dataset whose share is furthest behind its target at that point
(greedy: argmax_k of w_k * (i + 1) - taken_k, ties to the lowest k), so every prefix of the blend matches the
weights as closely as whole samples allow, and the order is deterministic without any RNG.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from megaeff.errors import DataError


def parse_blend(spec: Sequence, field: str) -> Tuple[List[float], List[str]]:
    """`[0.3, a, 0.7, b]`, `["0.3 a 0.7 b"]` or `[a]` -> (normalized weights, prefixes)."""
    tokens: List[str] = []
    for item in spec:
        tokens.extend(str(item).split())
    if not tokens:
        raise DataError(field, "no dataset paths given")
    if len(tokens) == 1:
        return [1.0], tokens
    if len(tokens) % 2:
        raise DataError(field, f"expected 'weight path' pairs, got an odd number of items: {tokens}")
    weights, prefixes = [], []
    for w, p in zip(tokens[0::2], tokens[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise DataError(field, f"blend weight {w!r} (before {p!r}) is not a number") from None
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise DataError(field, f"blend weight {w!r} for {p!r} must be a positive finite number")
        weights.append(weight)
        prefixes.append(p)
    total = sum(weights)
    return [w / total for w in weights], prefixes


def blending_indices(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset of sample i, index of that sample within its dataset) for i < size."""
    w = [float(x) for x in weights]
    taken = [0] * len(w)
    which = np.empty(size, dtype=np.int16 if len(w) < 2**15 else np.int32)
    within = np.empty(size, dtype=np.int64)
    k_range = range(len(w))
    # A plain-Python loop: per sample it costs a few list operations (~0.5 us for two datasets); the result is
    # cached by the caller, so this runs once per blend.
    for i in range(size):
        best, best_err = 0, w[0] * (i + 1) - taken[0]
        for k in k_range:
            err = w[k] * (i + 1) - taken[k]
            if err > best_err:
                best, best_err = k, err
        which[i] = best
        within[i] = taken[best]
        taken[best] += 1
    return which, within


class BlendedDataset:
    """`dataset_index` / `sample_index`: the output of `blending_indices` (cached by the caller)."""

    def __init__(self, datasets: Sequence, dataset_index: np.ndarray, sample_index: np.ndarray):
        self.datasets = list(datasets)
        self.size = len(dataset_index)
        self.dataset_index, self.sample_index = dataset_index, sample_index
        for k, ds in enumerate(self.datasets):
            need = int((self.dataset_index == k).sum())
            if need > len(ds):
                raise ValueError(f"dataset {k} has {len(ds)} samples, the blend needs {need}")

    def __len__(self) -> int:
        return self.size

    def sample(self, i: int):
        if not 0 <= i < self.size:
            raise IndexError(i)
        return self.datasets[int(self.dataset_index[i])].sample(int(self.sample_index[i]))

    def __getitem__(self, i: int):
        s = self.sample(i)
        return s["inputs"], s["labels"]

    def batch(self, indices):
        from megaeff.data.gpt_dataset import collate

        return collate([self.sample(int(i)) for i in indices])
