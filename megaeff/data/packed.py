"""Fixed-length samples packed across document boundaries, and the resumable global sample order.

Sample i covers tokens [i*T, i*T + T] of the stream (T+1 tokens: inputs and next-token labels), so every token
is predicted exactly once per epoch. A partial tail is dropped for training and kept for evaluation, padded with
label -100, so that validation perplexity covers every held-out token.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch

IGNORE_INDEX = -100


class PackedTokens:
    def __init__(self, tokens: np.ndarray, seq_len: int, keep_tail: bool = False):
        if tokens.ndim != 1:
            raise ValueError("token stream must be one-dimensional")
        self.tokens = tokens
        self.seq_len = seq_len
        full = max((len(tokens) - 1) // seq_len, 0)
        has_tail = keep_tail and (len(tokens) - 1) % seq_len > 0
        self.num_samples = full + int(has_tail)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        T = self.seq_len
        chunk = torch.from_numpy(np.asarray(self.tokens[i * T : i * T + T + 1], dtype=np.int64))
        inputs = torch.zeros(T, dtype=torch.int64)
        labels = torch.full((T,), IGNORE_INDEX, dtype=torch.int64)
        n = len(chunk) - 1
        inputs[:n] = chunk[:-1]
        labels[:n] = chunk[1:]
        return inputs, labels

    def batch(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        pairs = [self[int(i)] for i in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class GlobalSampleOrder:
    """Sample k of the run (k = 0, 1, ... over all epochs) -> dataset index.

    Epoch e is a permutation drawn from (seed, e), so position k is a pure function of k: a run resumed from
    `consumed_samples` continues exactly, whatever the data-parallel degree before or after.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("dataset has no samples")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        return self._perms[epoch]

    def __getitem__(self, k: int) -> int:
        epoch, pos = divmod(int(k), self.num_samples)
        return int(self._perm(epoch)[pos])

    def slice(self, start: int, count: int) -> List[int]:
        return [self[k] for k in range(start, start + count)]


def micro_batch_indices(order: GlobalSampleOrder, consumed: int, micro: int, dp: int, dp_rank: int, accum: int) -> List[List[int]]:
    """The dataset indices of this rank's `accum` micro-batches for the step starting at `consumed`.

    Megatron's layout: the global batch is `accum` consecutive slices of micro*dp samples, and rank r takes
    the r-th micro-sized piece of each slice.
    """
    out = []
    for a in range(accum):
        start = consumed + a * micro * dp + dp_rank * micro
        out.append(order.slice(start, micro))
    return out
