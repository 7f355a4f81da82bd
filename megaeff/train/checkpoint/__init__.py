"""Atomic, sharded, layout-independent checkpoints on torch.distributed.checkpoint (DCP), format version 2.

Layout of `<run_dir>/checkpoints/`:

    step_00000100/
        .metadata           DCP's index: every logical tensor's shape and dtype, and which chunk (global offsets,
                            sizes) lies where; pickled by DCP, read back with an allowlist (dcp_io.py)
        __<r>_0.distcp      rank r's chunks: only the boxes of the logical tensors it holds (tensor-parallel
                            slices, FSSDP row runs in whole 1x128 groups, its pipeline stage, expert shards, COAT
                            FP8 codes with their group rows); a replicated tensor is written once, by one replica
        optimizer.pt        the param groups' hyperparameters and the logical names in each
        trainer.pt          step, consumed_samples, scheduler state, format version, world size
        rng_rank<r>.pt      RNG states of rank r (CPU and CUDA)
        config.yaml         the resolved run config
        manifest.json       size and CRC-32 of every file, format version, step, write sequence number and time;
                            written last, so a directory without it is incomplete
    latest                  name of the newest complete checkpoint, replaced atomically after the rename

Logical tensors are keyed `model/<name>` and `optim/<name>/<state key>` by their single-process names, so a
checkpoint written under any layout loads under any other: each rank reads the bytes overlapping its own boxes
(pieces.py). All files but the DCP data and `.metadata` load with `weights_only=True`; nothing is unpickled
unchecked. Version 1 checkpoints (everything gathered to rank 0 of each stage, legacy.py) still load.

A checkpoint is written into `.tmp-step_N`, flushed, then renamed into place; a crash at any moment leaves the
previous checkpoint and `latest` intact. A full disk ends the save with DiskFullError on every rank (the CLI
exits with EXIT_DISK_FULL), the `.tmp-` directory removed. `keep_last` prunes by write order, never the
checkpoint just written. A resume verifies every checksum and falls back from a corrupt `latest` to the newest
checkpoint that verifies.

Modules: files.py (manifest, checksums, latest, order, pruning), pieces.py (LogicalTensor chunks), dcp_io.py
(DCP planners, safe reader), save.py / load.py (the collective save and load), async_save.py (the trainer's
Checkpointer, synchronous or in the background), legacy.py (format 1), consolidate.py (one-process reader and
writer for the converters), compare.py (what differs when a checkpoint does not fit the model).
"""

from megaeff.distributed.optimizer_state import load_optimizer_state_by_name, optimizer_state_by_name
from megaeff.train.checkpoint.async_save import Checkpointer, SaveRecord
from megaeff.train.checkpoint.collective import checkpoint_group
from megaeff.train.checkpoint.consolidate import read_logical_checkpoint, write_logical_checkpoint
from megaeff.train.checkpoint.dcp_io import read_metadata
from megaeff.train.checkpoint.files import (
    LATEST,
    MANIFEST,
    complete_checkpoints,
    file_entry,
    prune_checkpoints,
    read_latest,
    step_dir_name,
)
from megaeff.train.checkpoint.legacy import FORMAT_V1, save_v1
from megaeff.train.checkpoint.load import find_resume_dir, load_checkpoint, resolve_resume, verify_checkpoint
from megaeff.train.checkpoint.pieces import save_state, shard_bytes
from megaeff.train.checkpoint.rng import rng_state, set_rng_state
from megaeff.train.checkpoint.save import FORMAT_VERSION, save_checkpoint

__all__ = [
    "FORMAT_V1",
    "FORMAT_VERSION",
    "LATEST",
    "MANIFEST",
    "Checkpointer",
    "SaveRecord",
    "checkpoint_group",
    "complete_checkpoints",
    "file_entry",
    "find_resume_dir",
    "load_checkpoint",
    "load_optimizer_state_by_name",
    "optimizer_state_by_name",
    "prune_checkpoints",
    "read_latest",
    "read_logical_checkpoint",
    "read_metadata",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "save_state",
    "save_v1",
    "set_rng_state",
    "shard_bytes",
    "step_dir_name",
    "verify_checkpoint",
    "write_logical_checkpoint",
]
