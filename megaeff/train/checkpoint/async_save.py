"""The trainer's checkpointer: synchronous saves, or (`train.async_checkpoint=true`) saves that stage a copy of
this rank's shards, let training go on, and write in a background thread.

At most one save is in flight. The next save, a stop (SIGTERM, `exit_interval`, the wall-time limit) and the end
of the run wait for it (`wait`), and only then does the collective finalize run, on the main thread of every
rank in the same order: the manifest, the rename, `latest`, pruning. Until then `latest` names the previous
checkpoint, so a crash during a background write loses nothing.

The background thread runs `torch.distributed.checkpoint.save` on the checkpoint's own gloo process group
(created at start-up by every rank, collective.checkpoint_group), so its collectives never interleave with the
training ones. Staging is ours, not DCP's: DCP's default stager copies tensors and DTensors but not the
`LogicalTensor` chunks (pieces.py), so each chunk is cloned once into the staging copy, whose size is this
rank's shard (`staged_bytes`). Each save records the time the training loop was blocked (`blocked_s`).
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megaeff.train.checkpoint.collective import checkpoint_group
from megaeff.train.checkpoint.files import step_dir_name
from megaeff.train.checkpoint.pieces import assign_writers, save_state, shard_bytes
from megaeff.train.checkpoint.save import begin_save, finalize_save, write_or_clean


@dataclass
class SaveRecord:
    """One save on this rank. Seconds the training loop was blocked: `staged_s` inside `save()` (synchronous:
    the whole save; asynchronous: collecting the shards, the small files and the staging copy), `waited_s` at the
    wait point for the background write, `finalize_s` for the manifest, rename and `latest`; `blocked_s` is
    their sum. `write_s`: the write itself. Bytes: `held_bytes` of the logical tensors this rank holds,
    `shard_bytes` it writes (a replicated chunk is written by one holder), `staged_bytes` copied (asynchronous)."""

    step: int
    path: Path
    shard_bytes: int
    staged_s: float = 0.0
    waited_s: float = 0.0
    finalize_s: float = 0.0
    write_s: float = 0.0
    staged_bytes: int = 0
    held_bytes: int = 0
    asynchronous: bool = False
    pruned: List[Path] = field(default_factory=list)

    @property
    def blocked_s(self) -> float:
        return self.staged_s + self.waited_s + self.finalize_s


class Checkpointer:
    """Saves the checkpoints of one run under `root` (collective methods: every rank calls them in the same
    order). `log` receives one line per event (rank 0's is shown); `records` keeps every completed save;
    `writer`: the DCP FileSystemWriter class (tests inject a slow or full disk with it)."""

    def __init__(
        self,
        root: Path,
        *,
        rank: int,
        world_size: int,
        keep_last: int,
        async_save: bool = False,
        log: Callable[[str], None] = print,
        group=None,
        writer=None,
    ):
        self.root, self.rank, self.world_size, self.keep_last = Path(root), rank, world_size, keep_last
        self.async_save = async_save
        self.log, self.writer = log, writer
        self.group = group if group is not None else checkpoint_group(world_size)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple] = None  # (record, tmp, entries, future)
        self.records: List[SaveRecord] = []

    def _write(self, state, tmp: Path):
        t0 = time.perf_counter()
        kw = dict(rank=self.rank, world_size=self.world_size, group=self.group, writer=self.writer)
        return write_or_clean(state, tmp, **kw), time.perf_counter() - t0

    def save(self, step: int, *, model, optimizer, logical, trainer_state: Dict, config_yaml: str) -> Path:
        """Save the state at `step`; synchronous saves return once it is complete, asynchronous ones once the
        copy is staged. Returns the checkpoint's final path."""
        self.wait()
        t0 = time.perf_counter()
        held = save_state(model, optimizer, logical)
        state = assign_writers(held, self.rank, self.world_size, self.group)
        record = SaveRecord(step, self.root / step_dir_name(step), shard_bytes(state), asynchronous=self.async_save)
        record.held_bytes = shard_bytes(held)
        del held
        tmp, entries = begin_save(
            self.root,
            step,
            model=model,
            optimizer=optimizer,
            logical=logical,
            trainer_state=trainer_state,
            config_yaml=config_yaml,
            rank=self.rank,
            world_size=self.world_size,
            group=self.group,
        )
        if not self.async_save:
            more, record.write_s = self._write(state, tmp)
            entries.update(more)
            record.staged_s = time.perf_counter() - t0
            self._finalize(record, tmp, entries)
            return record.path
        staged = {k: v.staged() for k, v in state.items()}
        del state
        record.staged_bytes = shard_bytes(staged)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megaeff-ckpt")
        future = self._executor.submit(self._write, staged, tmp)
        record.staged_s = time.perf_counter() - t0
        self._pending = (record, tmp, entries, future)
        self.log(
            f"checkpoint step {step}: staged {record.staged_bytes / 2**20:.1f} MiB in {record.staged_s:.3f} s "
            "(training blocked), writing in the background"
        )
        return record.path

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def wait(self) -> Optional[Path]:
        """Wait for the save in flight, if any, and finalize it (collective). Returns its path."""
        if self._pending is None:
            return None
        record, tmp, entries, future = self._pending
        self._pending = None
        t0 = time.perf_counter()
        more, record.write_s = future.result()  # re-raises the write's error (every rank's)
        record.waited_s = time.perf_counter() - t0
        entries.update(more)
        self._finalize(record, tmp, entries)
        return record.path

    def _finalize(self, record: SaveRecord, tmp: Path, entries: Dict) -> None:
        t0 = time.perf_counter()
        _, record.pruned = finalize_save(
            self.root,
            tmp,
            record.step,
            entries,
            rank=self.rank,
            world_size=self.world_size,
            keep_last=self.keep_last,
            group=self.group,
        )
        record.finalize_s = time.perf_counter() - t0
        self.records.append(record)
        how = (
            f"asynchronous: staging {record.staged_s:.3f} s, waiting {record.waited_s:.3f} s"
            if record.asynchronous
            else "synchronous"
        )
        pruned = f"; removed {', '.join(p.name for p in record.pruned)}" if record.pruned else ""
        self.log(
            f"checkpoint saved: {record.path} ({record.shard_bytes / 2**20:.1f} MiB on this rank, written in "
            f"{record.write_s:.3f} s; training blocked {record.blocked_s:.3f} s, {how}){pruned}"
        )

    def close(self, finalize: bool = False) -> None:
        """Stop the background thread. A save still in flight (the run ended with an error, or `wait` was never
        called) is joined; with `finalize` (collective) it is then published, otherwise its `.tmp-` directory
        is removed and `latest` keeps naming the previous checkpoint: finalizing is a collective that a rank
        which failed alone would wait in forever."""
        try:
            if self._pending is not None and finalize:
                self.wait()
            elif self._pending is not None:
                record, tmp, _, future = self._pending
                self._pending = None
                try:
                    future.result()  # every rank's thread finishes DCP's write (its collectives are its own)
                finally:
                    if self.rank == 0:
                        shutil.rmtree(tmp, ignore_errors=True)
                    self.log(f"checkpoint step {record.step} was written but not published; `latest` is unchanged")
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
