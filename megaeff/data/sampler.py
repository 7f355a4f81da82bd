"""The resumable global sample order and its split over data-parallel ranks.

The position in the order (`consumed_samples`, a plain integer) is all a checkpoint needs to resume the data
stream, on the same or a different number of data-parallel ranks.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

IGNORE_INDEX = -100


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


def micro_batch_indices(
    order: GlobalSampleOrder, consumed: int, micro: int, dp: int, dp_rank: int, accum: int
) -> List[List[int]]:
    """The dataset indices of this rank's `accum` micro-batches for the step starting at `consumed`.

    Megatron's layout: the global batch is `accum` consecutive slices of micro*dp samples, and rank r takes
    the r-th micro-sized piece of each slice.
    """
    out = []
    for a in range(accum):
        start = consumed + a * micro * dp + dp_rank * micro
        out.append(order.slice(start, micro))
    return out
