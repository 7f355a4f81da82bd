"""`megaeff-convert hf-export`: a megaeff checkpoint -> a Hugging Face LLaMA directory.

    megaeff-convert hf-export <checkpoint dir> <out dir> [--max-shard-size 5GB] [--dtype float32] [--no-tokenizer]

Reads the checkpoint whole in this process (`read_logical_checkpoint`, either checkpoint format; no process
group) and its resolved config.yaml, and writes what megaeff/interop/hf_export.py describes: `transformers`
loads the directory with `LlamaForCausalLM.from_pretrained(dir)` (LOST with f = silu: `AutoModelForCausalLM.
from_pretrained(dir, trust_remote_code=True)`). The other direction needs no command: `megaeff-train
model.init_from=<hf dir>` converts a Hugging Face LLaMA when the run starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megaeff.errors import CheckpointError


def config_from_yaml(text: str, source: Path):
    """The typed config of a checkpoint's config.yaml. `model.init_from` is kept only where the export needs it
    (LOST: its channel set derives from the pretrained W0); elsewhere the directory may be long gone."""
    from omegaconf import OmegaConf

    from megaeff.config import Config, to_config

    if not text.strip():
        raise CheckpointError(source, "has no config.yaml; the export needs the run's config")
    raw = OmegaConf.create(text)
    method = OmegaConf.select(raw, "method.name")
    if OmegaConf.select(raw, "model.init_from") and method != "lost":
        raw.model.init_from = None
    return to_config(OmegaConf.merge(OmegaConf.structured(Config), raw))


def hf_export(args: argparse.Namespace) -> str:
    from megaeff.interop.hf_export import export_hf
    from megaeff.train.checkpoint import read_logical_checkpoint

    ckpt = Path(args.checkpoint)
    data = read_logical_checkpoint(ckpt)
    cfg = config_from_yaml(data["config_yaml"], ckpt)
    step = data["trainer"].get("step")
    result = export_hf(
        data["model"],
        cfg,
        Path(args.output),
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        tokenizer=not args.no_tokenizer,
        config_yaml=data["config_yaml"],
        provenance={"checkpoint": str(ckpt.resolve()), "step": step},
    )
    how = (
        "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)"
        if result.custom_code
        else "LlamaForCausalLM.from_pretrained(dir)"
    )
    return f"wrote {result.out_dir} ({', '.join(result.files)}) from step {step}; load with {how}"


def register(sub) -> None:
    p = sub.add_parser("hf-export", help="a checkpoint directory -> a Hugging Face LLaMA directory")
    p.add_argument("checkpoint", help="a checkpoint directory (step_...), either format")
    p.add_argument("output", help="the directory to create (must not exist or be empty)")
    p.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size (5GB)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weight dtype")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write the training tokenizer")
    p.set_defaults(func=hf_export)
