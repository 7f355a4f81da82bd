"""Format version 1: every tensor gathered to the single-process form and written by one rank per pipeline stage.

    step_00000100/
        model.pt / model.pp<k>.pt          {logical parameter name: tensor} (one per pipeline stage when pp > 1)
        optimizer.pt / optimizer.pp<k>.pt  {"hparams": [per param group], "state": {name: {state key: tensor}}}
        trainer.pt  rng_rank<r>.pt  config.yaml
        manifest.json                      file sizes, written last

Kept so that checkpoints written before format 2 still load (`load_v1`), for `read_v1` (the converters), and as the
baseline the checkpoint benchmark compares with (`save_v1`: peak memory is the whole model on one rank).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megaeff.distributed.optimizer_state import load_optimizer_state_by_name, optimizer_state_by_name
from megaeff.errors import CheckpointError
from megaeff.train.checkpoint.compare import describe_mismatch, expected_model
from megaeff.train.checkpoint.files import (
    MANIFEST,
    fsync_write,
    raise_if_disk_full,
    save_tensor_file,
    step_dir_name,
)
from megaeff.train.checkpoint.rng import rng_state, set_rng_state

FORMAT_V1 = 1


def load_file(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(path.parent, f"missing file {path.name}") from None
    except Exception as exc:  # corrupt zip, truncated pickle, disallowed global: all mean "do not trust this"
        raise CheckpointError(path.parent, f"cannot read {path.name}: {type(exc).__name__}: {exc}") from None


def save_v1(
    ckpt_root: Path,
    step: int,
    *,
    model,
    optimizer,
    trainer_state: Dict,
    config_yaml: str,
    rank: int,
    world_size: int,
    logical=None,
    shard: str = "",
    writes_shard: Optional[bool] = None,
) -> Path:
    """Collective: the format-1 checkpoint as megaeff wrote it before format 2 (no `latest`, no pruning)."""
    ckpt_root = Path(ckpt_root)
    final, tmp = ckpt_root / step_dir_name(step), ckpt_root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if world_size > 1:
        dist.barrier()
    save_tensor_file(rng_state(), tmp / f"rng_rank{rank}.pt")
    model_state = {k: v.detach() for k, v in model.state_dict().items()}
    optim_state = optimizer_state_by_name(model, optimizer)
    if logical is not None and logical.sharded:
        model_state, optim_state = logical.gather_model(model_state), logical.gather_optimizer(optim_state)
    if writes_shard if writes_shard is not None else rank == 0:
        _stream_tensor_file(model_state, tmp / f"model{shard}.pt")
        _stream_tensor_file(optim_state, tmp / f"optimizer{shard}.pt")
    if rank == 0:
        save_tensor_file(dict(trainer_state, format_version=FORMAT_V1, world_size=world_size), tmp / "trainer.pt")
        fsync_write(tmp / "config.yaml", config_yaml.encode())
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest = {"format_version": FORMAT_V1, "step": step, "files": files}
        fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    if world_size > 1:
        dist.barrier()
    return final


def _stream_tensor_file(obj, path: Path) -> None:
    """torch.save straight into the file, then fsync: how format 1 wrote its model and optimizer files (no
    serialized copy in memory, unlike files.save_tensor_file), so the benchmark's baseline peak is the gathered
    state itself (tools/bench/checkpoint.py)."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise_if_disk_full(exc, path)
        raise


def load_merged(path: Path, kind: str) -> Dict:
    """model.pt, or the union of every stage's model.pp<k>.pt (likewise optimizer)."""
    files = sorted(path.glob(f"{kind}.pp*.pt")) or [path / f"{kind}.pt"]
    parts = [load_file(f) for f in files]
    if kind == "model":
        return {k: v for part in parts for k, v in part.items()}
    merged = {
        "hparams": [dict(g, names=list(g["names"])) for g in parts[0]["hparams"]],
        "state": dict(parts[0]["state"]),
    }
    for part in parts[1:]:
        for group, more in zip(merged["hparams"], part["hparams"]):
            group["names"] += more["names"]
        merged["state"].update(part["state"])
    return merged


def read_v1(path: Path) -> Dict:
    """The whole checkpoint in one process: model, optimizer (logical), trainer state and config."""
    path = Path(path)
    config = path / "config.yaml"
    return dict(
        model=load_merged(path, "model"),
        optimizer=load_merged(path, "optimizer"),
        trainer=load_file(path / "trainer.pt"),
        config_yaml=config.read_text() if config.is_file() else "",
    )


def load_v1(path: Path, *, model, optimizer, rank: int, logical=None, expected_keys=None) -> Dict:
    """Restore a format-1 checkpoint in place (each rank keeps its shard; no communication); returns the trainer
    state. `expected_keys`: the logical model's state keys, given when `model` holds only some (a pipeline stage)."""
    state = load_merged(path, "model")
    saved_optim = load_merged(path, "optimizer")
    saved = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    problem = describe_mismatch(expected_model(model, logical), saved, expected_keys)
    if problem is not None:
        raise CheckpointError(path, problem)
    partial = expected_keys is not None
    if partial:
        local = model.state_dict().keys()
        state = {k: v for k, v in state.items() if k in local}
    if logical is not None and logical.sharded:
        try:
            state, saved_optim = logical.shard_model(state), logical.shard_optimizer(saved_optim)
        except (ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(path, f"does not fit the configured model and layout: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"model weights do not match the configured model: {exc}") from None
    load_optimizer_state_by_name(model, optimizer, saved_optim, path, partial=partial)
    trainer_state = load_file(path / "trainer.pt")
    rng_file = path / f"rng_rank{rank}.pt"
    # A run resumed on more ranks than it was saved with has no RNG file for the new ranks; they keep their seed.
    if rng_file.is_file():
        set_rng_state(load_file(rng_file))
    return trainer_state
