"""Atomic, layout-independent checkpoints.

Layout of `<run_dir>/checkpoints/`:

    step_00000100/
        model.pt        {logical parameter name: tensor}
        optimizer.pt    {"hparams": [per param group], "state": {parameter name: {state key: tensor}}}
                        (under pipeline parallelism one pair per stage, model.pp<k>.pt / optimizer.pp<k>.pt,
                        each holding the logical tensors of that stage; a load merges whatever pairs exist, so
                        any pipeline degree loads any other)
        trainer.pt      step, consumed_samples, scheduler state, format version
        rng_rank<r>.pt  RNG states of rank r (CPU and CUDA generators)
        config.yaml     the resolved run config
        manifest.json   file sizes; written last, so a directory without it is incomplete
    latest              name of the newest complete checkpoint, replaced atomically after the rename

A checkpoint is written into `.tmp-step_...`, flushed, then renamed into place; a crash at any moment leaves
the previous checkpoint and `latest` intact. Loads use `weights_only=True`: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megaeff.distributed.optimizer_state import load_optimizer_state_by_name, optimizer_state_by_name
from megaeff.errors import CheckpointError

FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "manifest.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_tensor_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> Dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


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
    shard: str = "",
    writes_shard: Optional[bool] = None,
) -> Path:
    """Collective over all ranks: rank 0 writes the shared files, every rank writes its RNG file.
    `logical` (megaeff.distributed.logical_state.LogicalState) turns sharded parameters and their optimizer
    state into logical tensors first (a collective over tp), so the files never depend on the layout.
    `shard` (".pp<k>" on a pipeline) names this stage's model/optimizer files, written by the rank with
    `writes_shard` (default: rank 0)."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(world_size)
    _save_tensor_file(rng_state(), tmp / f"rng_rank{rank}.pt")
    model_state = {k: v.detach() for k, v in model.state_dict().items()}
    optim_state = optimizer_state_by_name(model, optimizer)
    if logical is not None and logical.sharded:
        model_state, optim_state = logical.gather_model(model_state), logical.gather_optimizer(optim_state)
    if writes_shard if writes_shard is not None else rank == 0:
        _save_tensor_file(model_state, tmp / f"model{shard}.pt")
        _save_tensor_file(optim_state, tmp / f"optimizer{shard}.pt")
    if rank == 0:
        _save_tensor_file(dict(trainer_state, format_version=FORMAT_VERSION, world_size=world_size), tmp / "trainer.pt")
        _fsync_write(tmp / "config.yaml", config_yaml.encode())
    _barrier(world_size)
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
        _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_write(ckpt_root / f".{LATEST}.tmp", final.name.encode())
        os.replace(ckpt_root / f".{LATEST}.tmp", ckpt_root / LATEST)
        prune_checkpoints(ckpt_root, keep_last)
    _barrier(world_size)
    return final


def complete_checkpoints(ckpt_root: Path) -> List[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(
        p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MANIFEST).is_file()
    )


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    ckpts = complete_checkpoints(ckpt_root)
    for old in ckpts[: max(len(ckpts) - keep_last, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_dir(run_dir: Path, resume: str) -> Optional[Path]:
    """`none` -> None; `auto` -> the `latest` checkpoint of this run, if any; otherwise `resume` is a path."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(path, "does not exist")
        return path
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / MANIFEST).is_file():
            return target
    # `latest` missing or pointing at a removed directory: fall back to the newest complete one.
    ckpts = complete_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(path.parent, f"missing file {path.name}") from None
    except Exception as exc:  # corrupt zip, truncated pickle, disallowed global: all mean "do not trust this"
        raise CheckpointError(path.parent, f"cannot read {path.name}: {type(exc).__name__}: {exc}") from None


def verify_checkpoint(path: Path) -> Dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(path, "is incomplete (no manifest.json); it was interrupted while being written")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(path, f"manifest.json is unreadable: {exc}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"format version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(path, f"missing file {name}")
        if f.stat().st_size != size:
            raise CheckpointError(
                path, f"{name} has {f.stat().st_size} bytes, manifest says {size} (truncated or altered)"
            )
    return manifest


def _load_merged(path: Path, kind: str) -> Dict:
    """model.pt, or the union of every stage's model.pp<k>.pt (likewise optimizer)."""
    files = sorted(path.glob(f"{kind}.pp*.pt")) or [path / f"{kind}.pt"]
    parts = [_load(f) for f in files]
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


def load_checkpoint(path: Path, *, model, optimizer, rank: int, logical=None, expected_keys=None) -> Dict:
    """Restore model and optimizer in place; return the trainer state (step, data position, scheduler, ...).
    With `logical`, each rank keeps its shard of the logical tensors (no communication). `expected_keys`: the
    logical model's state keys, given when `model` holds only some of them (a pipeline stage)."""
    path = Path(path)
    verify_checkpoint(path)
    state = _load_merged(path, "model")
    saved_optim = _load_merged(path, "optimizer")
    partial = expected_keys is not None
    if partial:
        unknown = sorted(set(state) - set(expected_keys))
        if unknown:
            raise CheckpointError(path, f"model weights do not match the configured model: unexpected {unknown[:5]}")
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
    trainer_state = _load(path / "trainer.pt")
    rng_file = path / f"rng_rank{rank}.pt"
    # A run resumed on more ranks than it was saved with has no RNG file for the new ranks; they keep their seed.
    if rng_file.is_file():
        set_rng_state(_load(rng_file))
    return trainer_state
