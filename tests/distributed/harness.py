"""Multi-rank tests on one machine: a pool of spawned gloo ranks that runs a function on every rank.

    pool = RankPool(4)                         # spawns 4 processes once (seconds each on a small machine)
    results = pool.run(fn, arg, layout=dict(tp=2, dp=2))   # fn(dims, arg) on every rank -> list by rank
    pool.close()

`fn` must be picklable by reference (a module-level function of an importable module, e.g. the test module
itself, `tests.distributed.test_x`: spawned children get the parent's sys.path, where pytest put the repository
root). Each rank builds a `ParallelDims` for `layout` (any axes, the trainer's gating does not apply) with its
groups, cached per layout so repeated calls reuse communicators. Results come back pickled (tensors included)
and are compared on the test side.

Failures: an exception on any rank raises `RankError` in the test with that rank's traceback. A rank that does
not answer within `timeout` seconds (a hang, e.g. a collective the others never joined) raises `RankTimeout`;
in both cases where ranks may be left inside a collective the pool is torn down and respawned on the next call,
so one broken test cannot hang or poison the next. gloo's own collective timeout is set to `timeout` as well.

Use `pool_fixture` in a module: every module asking for the same size shares one pool for the session.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import pytest


class RankError(AssertionError):
    """An exception raised on a rank (the message carries the rank and its traceback)."""


class RankTimeout(AssertionError):
    """A rank did not answer in time (a hang: e.g. a collective the others never joined)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, timeout: float, tasks, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    from megaeff.distributed.dims import ParallelDims

    torch.set_num_threads(1)  # several ranks share few cores
    try:
        store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    except Exception:
        results.put((rank, False, traceback.format_exc()))
        return
    layouts: Dict[tuple, ParallelDims] = {}
    while True:
        task = tasks.get()
        if task is None:
            break
        try:
            fn, args, kwargs, layout = pickle.loads(task)
            key = tuple(sorted(layout.items()))
            dims = layouts.get(key)
            if dims is None:
                degrees = {a: int(layout.get(a, 1)) for a in ("tp", "cp", "dp", "pp")}
                degrees["dp"] = (
                    world // (degrees["tp"] * degrees["cp"] * degrees["pp"]) if "dp" not in layout else degrees["dp"]
                )
                dims = ParallelDims(**degrees, world_size=world, rank=rank)
                dims.build_groups()
                layouts[key] = dims
            dims.comm_stats.reset()
            out = fn(dims, *args, **kwargs)
            results.put((rank, True, pickle.dumps(out)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, timeout: float = 120.0):
        self.world_size, self.timeout = world_size, timeout
        self._procs: List[mp.Process] = []
        self._ctx = mp.get_context("spawn")

    def _start(self) -> None:
        port = free_port()
        self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
        self._results = self._ctx.Queue()
        self._procs = [
            self._ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self.timeout, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(
        self, fn: Callable, *args, layout: Optional[Dict[str, int]] = None, timeout: Optional[float] = None, **kwargs
    ) -> List[Any]:
        """fn(dims, *args, **kwargs) on every rank; the list of results indexed by rank."""
        if not self._procs:
            self._start()
        task = pickle.dumps((fn, args, kwargs, dict(layout or {})))
        for q in self._tasks:
            q.put(task)
        out: List[Any] = [None] * self.world_size
        pending = set(range(self.world_size))
        errors: Dict[int, str] = {}
        wait = self.timeout if timeout is None else timeout
        while pending:
            try:
                rank, ok, payload = self._results.get(timeout=wait)
            except queue.Empty:
                self.close(force=True)
                detail = "".join(f"\n--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items()))
                raise RankTimeout(f"ranks {sorted(pending)} gave no result within {wait:.0f} s{detail}") from None
            pending.discard(rank)
            if ok:
                out[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                wait = min(wait, 10.0)  # the others are likely stuck in a collective the failed rank left
        if errors:
            # Every rank answered, so none is stuck: the pool stays usable.
            raise RankError("".join(f"\n--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())))
        return out

    def close(self, force: bool = False) -> None:
        if not self._procs:
            return
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._procs = []


class RankPools:
    """One live pool per (world size, timeout) for the whole test session: a module asking for a pool gets the
    running one, so the suite pays each spawn (seconds of imports per rank on CI's two cores) and each teardown
    once, not once per module. Workers keep only process groups and their cached `ParallelDims` between tasks."""

    def __init__(self):
        self._pools: Dict[tuple, RankPool] = {}

    def get(self, world_size: int, timeout: float = 120.0) -> RankPool:
        key = (world_size, timeout)
        if key not in self._pools:
            self._pools[key] = RankPool(world_size, timeout)
        return self._pools[key]

    def close(self) -> None:
        for p in self._pools.values():
            p.close()
        self._pools.clear()


def pool_fixture(world_size: int, timeout: float = 120.0):
    """A module-scoped pytest fixture yielding the session's `RankPool` of this size (declare it in the test
    module: `pool = pool_fixture(4)`; the session fixture `rank_pools` is in tests/conftest.py)."""

    @pytest.fixture(scope="module")
    def _pool(rank_pools):
        return rank_pools.get(world_size, timeout)

    return _pool
