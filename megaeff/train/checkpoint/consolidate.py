"""A checkpoint as one process sees it, with no process group: every logical tensor whole. For the converters
(`megaeff-convert`) and for tests; it needs host memory for the whole model and optimizer state.

    read_logical_checkpoint(path) -> {"model": {logical name: tensor},
                                      "optimizer": {"hparams": [...], "state": {logical name: {key: tensor}}},
                                      "trainer": {...}, "config_yaml": str, "rng": {rank: RNG state},
                                      "format_version": 1 | 2}

`write_logical_checkpoint(data, path)` writes that form back as a format-2 checkpoint directory (the inverse,
used by `megaeff-convert torch-to-dcp`), loadable by `train.resume=<path>` under any layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict

import torch

from megaeff.errors import CheckpointError
from megaeff.train.checkpoint.dcp_io import METADATA, dcp_load, dcp_save, read_metadata
from megaeff.train.checkpoint.files import (
    file_entry,
    fsync_write,
    new_manifest,
    publish,
    save_tensor_file,
    write_manifest,
)
from megaeff.train.checkpoint.legacy import FORMAT_V1, load_file, read_v1
from megaeff.train.checkpoint.load import verify_checkpoint
from megaeff.train.checkpoint.pieces import MODEL, OPTIM, LogicalTensor, model_key, optim_key, split_key
from megaeff.train.checkpoint.save import CONFIG, FORMAT_VERSION, HPARAMS, TRAINER

KEYS = ("model", "optimizer", "trainer", "config_yaml")


def read_logical_checkpoint(path: Path, verify: bool = True) -> Dict:
    """Every logical tensor of a checkpoint (format 1 or 2) in this process, DCP chunks consolidated."""
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else {"format_version": FORMAT_VERSION}
    if manifest.get("format_version") == FORMAT_V1:
        return dict(read_v1(path), rng=read_rng(path), format_version=FORMAT_V1)
    md = read_metadata(path)
    state = {
        k: LogicalTensor.whole(torch.empty(tuple(v.size), dtype=v.properties.dtype))
        for k, v in md.state_dict_metadata.items()
    }
    dcp_load(state, path, md, local=True)
    model: Dict[str, torch.Tensor] = {}
    optim: Dict[str, Dict[str, torch.Tensor]] = {}
    for fqn, t in state.items():
        kind, name, key = split_key(fqn)
        full = t.chunks[0][1]
        if kind == MODEL:
            model[name] = full
        elif kind == OPTIM:
            optim.setdefault(name, {})[key] = full
    config = path / CONFIG
    return dict(
        model=model,
        optimizer={"hparams": load_file(path / HPARAMS)["hparams"], "state": optim},
        trainer=load_file(path / TRAINER),
        config_yaml=config.read_text() if config.is_file() else "",
        rng=read_rng(path),
        format_version=FORMAT_VERSION,
    )


def write_logical_checkpoint(data: Dict, path: Path) -> Path:
    """Write the `read_logical_checkpoint` form as a complete format-2 checkpoint directory at `path` (which
    must not exist), in this process."""
    path = Path(path)
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise CheckpointError(path, f"the consolidated state has no {missing} (expected the keys {list(KEYS)})")
    if path.exists():
        raise CheckpointError(path, "already exists; choose a new directory")
    tmp = path.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = {model_key(n): LogicalTensor.whole(t) for n, t in data["model"].items()}
        for name, st in data["optimizer"]["state"].items():
            state.update({optim_key(name, k): LogicalTensor.whole(torch.as_tensor(v)) for k, v in st.items()})
        dcp_save(state, tmp, local=True)
        trainer = dict(data["trainer"], format_version=FORMAT_VERSION, world_size=1)
        save_tensor_file(trainer, tmp / TRAINER)
        save_tensor_file({"hparams": data["optimizer"]["hparams"]}, tmp / HPARAMS)
        for rank, rng in data.get("rng", {}).items():
            save_tensor_file(rng, tmp / f"rng_rank{int(rank)}.pt")
        fsync_write(tmp / CONFIG, str(data["config_yaml"]).encode())
        names = [p.name for p in tmp.iterdir()]
        files = {n: file_entry(tmp / n) for n in sorted(names)}
        assert METADATA in files
        step = int(data["trainer"].get("step", 0))
        write_manifest(tmp, new_manifest(step, 1, FORMAT_VERSION, files))
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_rng(path: Path) -> Dict[int, Dict]:
    """The per-rank RNG states of a checkpoint, by rank."""
    out = {}
    for f in Path(path).glob("rng_rank*.pt"):
        rank = f.stem.removeprefix("rng_rank")
        if rank.isdigit():
            out[int(rank)] = load_file(f)
    return out
