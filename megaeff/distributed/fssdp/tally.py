"""What one FSSDP object moved in a step: the byte tally shared by its engine (gathers), its gradient sync
(reduce-scatters, all-reduces) and its sparse embedding (row exchanges).

`dims.comm_stats` (megaeff/distributed/comm.py) counts every collective of the process; this counts only this
FSSDP's, under the same "group/kind" keys, between two `close_step()` calls (the gradient sync's `finish()`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict

from megaeff.distributed.comm import CommGroup

GATHER_KINDS = ("/all_gather", "/sparse_all_gather")
REDUCE_KINDS = ("/reduce_scatter", "/sparse_reduce_scatter", "/all_reduce")


class ByteTally:
    """Bytes per "group/kind" and dense unit gathers per way (`prefetched`: overlapped with compute; `waited`:
    issued and waited for on the spot), running and as of the last closed step."""

    def __init__(self):
        self.running: Dict[str, int] = defaultdict(int)
        self.gathers: Dict[str, int] = {"prefetched": 0, "waited": 0}
        self.last_step: Dict[str, int] = {}
        self.last_gathers: Dict[str, int] = {}

    def count(self, kind: str, nbytes: int, cg: CommGroup) -> None:
        """Record `nbytes` of a `kind` collective over `cg` (nothing for a group of one: it is a no-op)."""
        if cg.size > 1:
            self.running[f"{cg.name}/{kind}"] += nbytes

    def gathered(self, way: str) -> None:
        """One dense unit gather consumed, `way` = prefetched | waited."""
        self.gathers[way] += 1

    def close_step(self) -> None:
        """The running totals become `last_step` / `last_gathers`, and start again from zero."""
        self.last_step, self.last_gathers = dict(self.running), dict(self.gathers)
        self.running.clear()
        self.gathers = {"prefetched": 0, "waited": 0}

    @property
    def bytes_gathered_last_step(self) -> int:
        """Parameter bytes this rank's gathers moved in the last step (dense and sparse)."""
        return sum(v for k, v in self.last_step.items() if k.endswith(GATHER_KINDS))

    @property
    def bytes_reduced_last_step(self) -> int:
        return sum(v for k, v in self.last_step.items() if k.endswith(REDUCE_KINDS))
