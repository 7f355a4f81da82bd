"""Writing a format-2 checkpoint, in the phases the synchronous and the asynchronous save share:

1. `begin_save` (collective): rank 0 makes `.tmp-step_N`; every rank writes its RNG file, rank 0 the trainer
   state, the resolved config and the optimizer's param-group hparams (merged over ranks);
2. `write_data`: DCP writes this rank's chunks (`__<rank>_0.distcp`, rank 0 `.metadata` last); each rank then
   checksums the files it wrote. The asynchronous save runs this in a background thread on a staged copy;
3. `finalize_save` (collective, main thread): rank 0 writes the manifest (size and CRC-32 of every file), renames
   the directory into place, points `latest` at it and prunes.

A failure on any rank (a full disk included) is raised on every rank after rank 0 removed the `.tmp-` directory:
the previous checkpoint and `latest` are untouched.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

from megaeff.distributed.optimizer_state import optimizer_state_by_name
from megaeff.train.checkpoint.collective import agree, all_gather_obj, barrier
from megaeff.train.checkpoint.dcp_io import METADATA, dcp_save
from megaeff.train.checkpoint.files import (
    file_entry,
    fsync_write,
    new_manifest,
    next_seq,
    prune_checkpoints,
    publish,
    save_tensor_file,
    step_dir_name,
    write_latest,
    write_manifest,
)
from megaeff.train.checkpoint.pieces import LogicalTensor, assign_writers, logical_names, save_state
from megaeff.train.checkpoint.rng import rng_state

FORMAT_VERSION = 2
HPARAMS = "optimizer.pt"
TRAINER = "trainer.pt"
CONFIG = "config.yaml"

Entries = Dict[str, Dict[str, object]]


def merged_hparams(model, optimizer, logical, world_size: int, group=None) -> List[Dict]:
    """The optimizer's param groups (hyperparameters and the logical names of their tensors), the union over all
    ranks (each pipeline stage holds some names; replicas hold the same)."""
    mine = [
        dict(g, names=[n for name in g["names"] for n in logical_names(logical, name)])
        for g in optimizer_state_by_name(model, optimizer)["hparams"]
    ]
    merged = None
    for theirs in all_gather_obj(mine, world_size, group):
        if merged is None:
            merged = [dict(g, names=list(g["names"])) for g in theirs]
            continue
        for group_hp, more in zip(merged, theirs):
            group_hp["names"] += [n for n in more["names"] if n not in group_hp["names"]]
    for group_hp in merged or []:
        group_hp["names"].sort(key=natural_key)  # one order whatever the layout (stages hold interleaved layers)
    return merged or []


def natural_key(name: str) -> List:
    """layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def begin_save(
    root: Path,
    step: int,
    *,
    model,
    optimizer,
    logical,
    trainer_state: Dict,
    config_yaml: str,
    rank: int,
    world_size: int,
    group=None,
) -> Tuple[Path, Entries]:
    """Phase 1 (collective): the `.tmp-` directory and the small files. Returns (tmp, this rank's file entries)."""
    root = Path(root)
    tmp = root / f".tmp-{step_dir_name(step)}"

    def make_dir() -> None:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()

    agree(make_dir, world_size=world_size, group=group, path=tmp)
    hparams = merged_hparams(model, optimizer, logical, world_size, group)

    def small_files() -> Entries:
        files = {f"rng_rank{rank}.pt": rng_state()}
        if rank == 0:
            files[TRAINER] = dict(trainer_state, format_version=FORMAT_VERSION, world_size=world_size)
            files[HPARAMS] = {"hparams": hparams}
        for name, obj in files.items():
            save_tensor_file(obj, tmp / name)
        if rank == 0:
            fsync_write(tmp / CONFIG, config_yaml.encode())
            files[CONFIG] = None
        return {name: file_entry(tmp / name) for name in files}

    entries = agree(small_files, world_size=world_size, group=group, path=tmp, cleanup=_remover(tmp, rank))
    return tmp, entries


def _remover(tmp: Path, rank: int):
    def remove() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    return remove


def write_data(
    state: Dict[str, LogicalTensor], tmp: Path, *, rank: int, world_size: int, group=None, writer=None
) -> Entries:
    """Phase 2 (collective over `group`): DCP writes every rank's chunks; returns the entries of the files this
    rank wrote. Raises on every rank if any failed (DiskFullError for a full disk)."""
    dcp_save(state, tmp, group=group, writer=writer, local=world_size <= 1)
    names = sorted(p.name for p in tmp.glob(f"__{rank}_*.distcp")) + ([METADATA] if rank == 0 else [])
    return {name: file_entry(tmp / name) for name in names}


def finalize_save(
    root: Path, tmp: Path, step: int, entries: Entries, *, rank: int, world_size: int, keep_last: int, group=None
) -> Tuple[Path, List[Path]]:
    """Phase 3 (collective): manifest, rename, `latest`, pruning. Returns (the checkpoint, what was pruned)."""
    root, final = Path(root), Path(root) / step_dir_name(step)
    gathered = all_gather_obj(entries, world_size, group)
    removed: List[Path] = []

    def publish_all() -> None:
        if rank != 0:
            return
        files = {name: entry for part in gathered for name, entry in part.items()}
        write_manifest(tmp, new_manifest(step, next_seq(root), FORMAT_VERSION, files, world_size=world_size))
        publish(tmp, final)
        write_latest(root, final.name)
        removed.extend(prune_checkpoints(root, keep_last, keep=final))

    agree(publish_all, world_size=world_size, group=group, path=tmp, cleanup=_remover(tmp, rank))
    barrier(world_size, group)
    return final, removed


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model,
    optimizer,
    trainer_state: Dict,
    config_yaml: str,
    rank: int,
    world_size: int,
    keep_last: int,
    logical=None,
    group=None,
    writer=None,
) -> Path:
    """A synchronous format-2 save (collective over all ranks): every rank writes only its own shards. `logical`
    (the ParallelModel's LogicalState) says which boxes of which logical tensors this rank holds; `writer`: a
    FileSystemWriter class (tests inject faults with it)."""
    state = assign_writers(save_state(model, optimizer, logical), rank, world_size, group)
    tmp, entries = begin_save(
        ckpt_root,
        step,
        model=model,
        optimizer=optimizer,
        logical=logical,
        trainer_state=trainer_state,
        config_yaml=config_yaml,
        rank=rank,
        world_size=world_size,
        group=group,
    )
    entries.update(write_or_clean(state, tmp, rank=rank, world_size=world_size, group=group, writer=writer))
    return finalize_save(
        ckpt_root, tmp, step, entries, rank=rank, world_size=world_size, keep_last=keep_last, group=group
    )[0]


def write_or_clean(state, tmp: Path, *, rank: int, world_size: int, group=None, writer=None) -> Entries:
    """`write_data`, removing the `.tmp-` directory (rank 0) when it failed; DCP has already made every rank
    raise."""
    try:
        return write_data(state, tmp, rank=rank, world_size=world_size, group=group, writer=writer)
    except BaseException:
        _remover(tmp, rank)()
        raise
