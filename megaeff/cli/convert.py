"""`megaeff-convert`: move checkpoints between megaeff's sharded format and other forms.

    megaeff-convert dcp-to-torch <checkpoint dir> <file.pt>   one consolidated file (format 1 or 2 in)
    megaeff-convert torch-to-dcp <file.pt> <checkpoint dir>   back to a sharded checkpoint (format 2)
    megaeff-convert hf-export <checkpoint dir> <out dir>      a Hugging Face LLaMA directory (megaeff/cli/convert_hf.py)

The consolidated file is `megaeff.train.checkpoint.read_logical_checkpoint`'s dict: {"model": {logical name:
tensor}, "optimizer": {"hparams", "state"}, "trainer", "config_yaml", "rng", "format_version"}, every tensor
whole; it loads with `torch.load(file, weights_only=True)`. A directory written by torch-to-dcp resumes with
`megaeff-train train.resume=<dir>` under any layout. Neither command needs a process group; both hold the
whole model in host memory.

Each subcommand is a function `_<name>(args)` registered in `SUBCOMMANDS` with its parser; more (e.g. Hugging
Face export) are added the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional

import torch

from megaeff.cli import convert_hf
from megaeff.errors import EXIT_USAGE, CheckpointError, MegaeffError


def _dcp_to_torch(args: argparse.Namespace) -> str:
    from megaeff.train.checkpoint import read_logical_checkpoint

    data = read_logical_checkpoint(Path(args.checkpoint))
    out = Path(args.output)
    if out.exists() and not args.force:
        raise CheckpointError(out, "already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(data, tmp)
    tmp.replace(out)
    n = sum(t.numel() for t in data["model"].values())
    return f"wrote {out}: {len(data['model'])} model tensors ({n:,} values), step {data['trainer'].get('step')}"


def _torch_to_dcp(args: argparse.Namespace) -> str:
    from megaeff.train.checkpoint import write_logical_checkpoint

    src = Path(args.file)
    try:
        data = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(src, "does not exist") from None
    except Exception as exc:  # a pickled object, a damaged file: refuse, never execute
        raise CheckpointError(src, f"cannot read it: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(src, f"holds a {type(data).__name__}, not megaeff-convert dcp-to-torch's dict")
    path = write_logical_checkpoint(data, Path(args.checkpoint))
    return f"wrote {path}: {len(data['model'])} model tensors; resume with train.resume={path}"


def _parsers(sub) -> None:
    p = sub.add_parser("dcp-to-torch", help="a checkpoint directory -> one consolidated torch file")
    p.add_argument("checkpoint", help="a checkpoint directory (step_...), format 1 or 2")
    p.add_argument("output", help="the .pt file to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_dcp_to_torch)
    p = sub.add_parser("torch-to-dcp", help="a consolidated torch file -> a sharded checkpoint directory")
    p.add_argument("file", help="a file written by dcp-to-torch")
    p.add_argument("checkpoint", help="the checkpoint directory to create (must not exist)")
    p.set_defaults(func=_torch_to_dcp)


# Subcommand registrations: functions adding parsers to the subparsers object (one per family of formats).
SUBCOMMANDS: List[Callable] = [_parsers, convert_hf.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaeff-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        print(args.func(args), flush=True)
    except MegaeffError as exc:
        print(f"megaeff: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))


if __name__ == "__main__":
    main()
