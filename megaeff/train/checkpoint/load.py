"""Finding, verifying and loading a checkpoint, format 2 (DCP, resharded on load) or 1 (legacy.py).

Verification reads every file once and compares its size and CRC-32 with the manifest, the files split over the
ranks. `resolve_resume` takes `latest`, or when it is unusable (missing, binary bytes, naming a removed or
corrupt checkpoint) the newest checkpoint by write order that verifies, and says so in the notes it returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megaeff.distributed.optimizer_state import load_optimizer_state_by_name
from megaeff.errors import CheckpointError
from megaeff.train.checkpoint.collective import agree, all_gather_obj, raise_problem
from megaeff.train.checkpoint.compare import describe_mismatch, expected_model
from megaeff.train.checkpoint.dcp_io import dcp_load, read_metadata
from megaeff.train.checkpoint.files import check_files, complete_checkpoints, read_latest, read_manifest
from megaeff.train.checkpoint.legacy import FORMAT_V1, load_file, load_v1
from megaeff.train.checkpoint.pieces import MODEL, load_targets, logical_names, split_key
from megaeff.train.checkpoint.rng import set_rng_state
from megaeff.train.checkpoint.save import FORMAT_VERSION, HPARAMS, TRAINER

FORMATS = (FORMAT_V1, FORMAT_VERSION)


def verify_checkpoint(path: Path, *, rank: int = 0, world_size: int = 1, group=None) -> Dict:
    """The manifest, once every file matches it (collective: rank r checks every world_size-th file). Raises
    CheckpointError on every rank otherwise."""
    path = Path(path)

    def check() -> Dict:
        manifest = read_manifest(path)
        version = manifest.get("format_version")
        if version not in FORMATS:
            raise CheckpointError(path, f"format version {version!r} is not one this megaeff reads ({FORMATS})")
        problem = check_files(path, manifest, sorted(manifest["files"])[rank::world_size])
        if problem is not None:
            raise CheckpointError(path, problem)
        return manifest

    return agree(check, world_size=world_size, group=group, path=path)


def find_resume_dir(run_dir: Path, resume: str) -> Optional[Path]:
    """`none` -> None; `auto` -> the `latest` checkpoint of this run (else the newest complete one by write
    order), not verified; otherwise `resume` is a path."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(path, "does not exist")
        return path
    root = Path(run_dir) / "checkpoints"
    latest, _ = read_latest(root)
    if latest is not None:
        return latest
    ckpts = complete_checkpoints(root)
    return ckpts[-1] if ckpts else None


def resolve_resume(
    run_dir: Path, resume: str, *, rank: int = 0, world_size: int = 1, group=None
) -> Tuple[Optional[Path], List[str]]:
    """The checkpoint to resume from, verified, and notes for the log (collective). `auto`: `latest`, falling
    back to the newest checkpoint that verifies; a path must verify."""
    if resume != "auto":
        path = find_resume_dir(run_dir, resume)
        if path is not None:
            verify_checkpoint(path, rank=rank, world_size=world_size, group=group)
        return path, []
    root = Path(run_dir) / "checkpoints"
    latest, why = read_latest(root)
    notes = [f"{why}; taking the newest checkpoint that verifies"] if why else []
    candidates = ([latest] if latest is not None else []) + [
        p for p in reversed(complete_checkpoints(root)) if p != latest
    ]
    failures = []
    for path in candidates:
        try:
            verify_checkpoint(path, rank=rank, world_size=world_size, group=group)
        except CheckpointError as exc:
            failures.append(str(exc))
            notes.append(f"{exc}; falling back to an older checkpoint")
            continue
        if failures or why:
            notes.append(f"resuming from {path}, the newest checkpoint that verifies")
        return path, notes
    if failures:
        raise CheckpointError(root, "no checkpoint verifies:\n  " + "\n  ".join(failures))
    return None, notes


def load_checkpoint(
    path: Path,
    *,
    model,
    optimizer,
    rank: int,
    logical=None,
    expected_keys=None,
    world_size: int = 1,
    group=None,
    verify: bool = True,
) -> Dict:
    """Restore model and optimizer in place (each rank reads only what overlaps its shards) and this rank's RNG;
    return the trainer state (step, data position, scheduler). Collective. `expected_keys`: the logical model's
    names when `model` holds only some (a pipeline stage); `verify=False` when `resolve_resume` just did."""
    path = Path(path)
    if verify:
        manifest = verify_checkpoint(path, rank=rank, world_size=world_size, group=group)
    else:
        manifest = read_manifest(path)
    if manifest.get("format_version") == FORMAT_V1:
        return agree(
            lambda: load_v1(
                path, model=model, optimizer=optimizer, rank=rank, logical=logical, expected_keys=expected_keys
            ),
            world_size=world_size,
            group=group,
            path=path,
        )
    md = agree(
        lambda: _checked_metadata(path, model, logical, expected_keys), world_size=world_size, group=group, path=path
    )
    targets = load_targets(model, optimizer, logical, md.state_dict_metadata)
    problems = all_gather_obj(_missing(targets.state, md.state_dict_metadata), world_size, group)
    for r, problem in enumerate(problems):
        if problem is not None:
            raise_problem(("checkpoint", str(path), problem), r, path)
    dcp_load(targets.state, path, md, group=group, local=world_size <= 1)

    def install() -> Dict:
        targets.finish(logical)
        _compare_buffers(path, targets.buffers)
        hparams = load_file(path / HPARAMS)["hparams"]
        saved = {"hparams": _local_hparams(model, logical, hparams), "state": targets.optim}
        load_optimizer_state_by_name(model, optimizer, saved, path, partial=expected_keys is not None)
        trainer_state = load_file(path / TRAINER)
        rng_file = path / f"rng_rank{rank}.pt"
        # A run resumed on more ranks than it was saved with has no RNG file for the new ranks; they keep their seed.
        if rng_file.is_file():
            set_rng_state(load_file(rng_file))
        return trainer_state

    return agree(install, world_size=world_size, group=group, path=path)


def _checked_metadata(path: Path, model, logical, expected_keys):
    md = read_metadata(path)
    saved = {}
    for fqn, item in md.state_dict_metadata.items():
        kind, name, _ = split_key(fqn)
        if kind == MODEL:
            saved[name] = (tuple(item.size), item.properties.dtype)
    problem = describe_mismatch(expected_model(model, logical), saved, expected_keys)
    if problem is not None:
        raise CheckpointError(path, problem)
    return md


def _missing(state: Dict, saved: Dict) -> Optional[str]:
    missing = sorted(k for k in state if k not in saved)
    if not missing:
        return None
    return f"has no {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (saved by another optimizer?)"


def _compare_buffers(path: Path, buffers) -> None:
    """Persistent buffers (SLTrain/LOST index checksums) are regenerated from the seed, not loaded: a checkpoint
    whose value differs was trained with other supports."""
    for name, loaded, current in buffers:
        if not torch.equal(loaded, current.to(loaded.device)):
            raise CheckpointError(
                path,
                f"{name} differs from the checkpoint's: the regenerated indices (SLTrain's sparse_index, LOST's "
                "channel_index) are not those it was trained with (another train.seed, method.density or shape); "
                "build the model with the checkpoint's config",
            )


def _local_hparams(model, logical, hparams: List[Dict]) -> List[Dict]:
    """The checkpoint's param groups with this rank's parameter names (an experts' flat parameter stands for its
    logical tensors)."""
    to_local = {ln: n for n, _ in model.named_parameters() for ln in logical_names(logical, n)}
    out = []
    for g in hparams:
        names: List[str] = []
        for n in g["names"]:
            n = to_local.get(n, n)
            if n not in names:
                names.append(n)
        out.append(dict(g, names=names))
    return out
