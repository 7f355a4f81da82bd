"""Parameter counts and training-state bytes of a model flavor under each linear method, without allocating it.

    megaeff-estimate-memory --model llama_60m                       # dense + the 60m presets of every method
    megaeff-estimate-memory --model llama_1b --method sltrain_1b --method lost_1b --json
    megaeff-estimate-memory --model llama_7b --method sltrain_7b --set method.density=0.03
    megaeff-estimate-memory --model llama_1b --paper-formula       # SLTrain's estimate: bf16 weights and states,
                                                                    # no grads, int64 indices

    megaeff-estimate-memory --measure --model llama_7b --method lost_7b --set precision=coat \
        --set data.seq_len=2048 --set train.micro_batch_size=1   # the peak of one whole training step

`--measure` runs one real training step (forward, backward, clipping, optimizer; megaeff/train/memory/) of one
rank (`--rank`) of the configured layout on fake tensors, and prints its peak live tensor bytes with their
breakdown at the peak and the phase that held it; `--set` takes any Hydra override (precision=coat,
train.activation_checkpointing=true, parallel.tp=2, train.grad_accum=4, ...). Without it:

The model is composed from conf/ exactly as `megaeff-train model=... method=...` would, then built on the meta
device: parameter and buffer shapes only (LOST's SVD runs at initialization, which never happens here). Bytes
are the training state of the configured optimizer: AdamW's, or GaLore's with `--set optim=galore` (projected
moments plus projector; `megaeff.train.perf.estimate_state_memory`); "B/dense param" divides the total by
the parameter count of the dense model of the same flavor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megaeff.errors import EXIT_USAGE, MegaeffError

METHOD_PREFIXES = ("lowrank", "sltrain", "lost")


def compose(model: str, method: str, sets: Sequence[str] = ()):
    """The typed config `megaeff-train model=... method=...` would run, validated (megaeff.config.compose)."""
    from megaeff.config import compose as compose_config

    return compose_config([f"model={model}", f"method={method}", *sets])


def default_methods(model: str) -> List[str]:
    """dense, then for each method its preset for this size (llama_60m -> sltrain_60m) or the generic one."""
    from megaeff.config import conf_dir

    options = {p.stem for p in (Path(conf_dir()) / "method").glob("*.yaml")}
    size = model.split("_", 1)[1] if model.startswith("llama_") else None
    return ["dense"] + [f"{m}_{size}" if f"{m}_{size}" in options else m for m in METHOD_PREFIXES]


def estimate(model: str, method: str, sets: Sequence[str] = (), **dtypes) -> Dict:
    # Imported here so that --help does not pay for torch.
    from megaeff.config.schema import MethodConfig
    from megaeff.layers.linear import describe_method, method_layers
    from megaeff.models.llama import build_llama, count_params
    from megaeff.train.perf import estimate_state_memory

    cfg = compose(model, method, sets)  # validated
    net = build_llama(cfg.model, cfg.method, device="meta")
    dense = count_params(build_llama(cfg.model, MethodConfig(), device="meta"))
    row = {"model": model, "preset": method, "method": cfg.method.name, "optimizer": str(cfg.optim.name)}
    row.update(estimate_state_memory(net, **dtypes, ocfg=cfg.optim))  # optim=galore: its projected state
    row["nnz"] = sum(getattr(layer, "nnz", 0) for _, layer in method_layers(net))
    row["dense_params"] = dense
    row["bytes_per_dense_param"] = row["mem_total_bytes"] / dense
    row["description"] = describe_method(net)
    return row


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _b(n: int) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def format_table(rows: Sequence[Dict]) -> str:
    head = ("preset", "params", "exact", "nnz", "weights", "grads", "optim state", "index", "total", "B/dense param")
    lines = [
        (
            r["preset"],
            _m(r["params"]),
            f"{r['params']:,}",
            _m(r["nnz"]) if r["nnz"] else "-",
            _b(r["mem_params_bytes"]),
            _b(r["mem_grads_bytes"]),
            _b(r["mem_optim_bytes"]),
            _b(r["mem_index_bytes"]),
            _b(r["mem_total_bytes"]),
            f"{r['bytes_per_dense_param']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]

    def fmt(cells):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megaeff-estimate-memory",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="llama_60m", help="model flavor (conf/model/*.yaml), default llama_60m")
    p.add_argument(
        "--method",
        action="append",
        default=None,
        help="method preset (conf/method/*.yaml); repeat for several; default dense + this size's presets",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override, e.g. method.density=0.05 (applies to every method)",
    )
    p.add_argument("--param-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--grad-dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: the param dtype")
    p.add_argument("--no-grads", action="store_true", help="count no gradients (per-layer optimizer steps)")
    p.add_argument("--state-dtype", default="fp32", choices=["fp32", "bf16", "fp16", "fp8"], help="AdamW states")
    p.add_argument("--index-dtype", default="int32", choices=["int32", "int64"], help="sparse index entries")
    p.add_argument(
        "--paper-formula",
        action="store_true",
        help="SLTrain's estimate: bf16 weights, bf16 AdamW states, no grads, int64 indices",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument(
        "--measure",
        action="store_true",
        help="measure the peak of one whole training step on fake tensors (one --method, default dense)",
    )
    p.add_argument("--rank", type=int, default=0, help="with --measure: which rank of the layout, default 0")
    return p


CATEGORY_LABELS = {
    "parameters": "parameters",
    "buffers": "buffers (indices, RoPE tables)",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "comm_buffers": "communication buffers",
    "activations": "activations saved for backward",
    "temporaries": "temporaries",
}


def measure(model: str, method: str, sets: Sequence[str] = (), rank: int = 0) -> Dict:
    """One training step of `rank` on fake tensors (megaeff/train/memory/fake_step.py): peak and breakdown."""
    from megaeff.train.memory.fake_step import measure_step

    cfg = compose(model, method, sets)
    row = {"model": model, "preset": method, "overrides": list(sets), "precision": str(cfg.precision.name)}
    row.update(measure_step(cfg, rank=rank).as_dict())
    return row


def format_measure(row: Dict) -> str:
    layout = " ".join(f"{a}={n}" for a, n in row["layout"].items())
    sets = f" ({' '.join(row['overrides'])})" if row["overrides"] else ""
    where = row["phase"] + (f", micro-batch {row['microbatch']}" if row["microbatch"] >= 0 else "")
    lines = [
        f"{row['model']} / {row['preset']}{sets}: one training step of rank {row['rank']} ({layout}), fake tensors",
        f"peak {row['peak_gb']:.3f} GB ({row['peak_gib']:.3f} GiB) of live tensors, during {where}",
        "breakdown at the peak:",
    ]
    for key, label in CATEGORY_LABELS.items():
        n = row["breakdown"][key]
        share = n / row["peak_bytes"] if row["peak_bytes"] else 0.0
        lines.append(f"  {label:<32} {n / 1e9:9.3f} GB {n / 2**30:9.3f} GiB {100 * share:6.1f}%")
    if row["largest_at_peak"]:
        lines.append("largest other storages at the peak (what made them):")
        for item in row["largest_at_peak"][:6]:
            lines.append(f"  {item['bytes'] / 1e9:9.3f} GB  {item['category']:<12} {item['made_by']}")
    return "\n".join(lines)


def _main_measure(args) -> int:
    if args.paper_formula or args.no_grads:
        raise MegaeffError("--paper-formula and --no-grads belong to the state-only estimate, not to --measure")
    if args.method and len(args.method) > 1:
        raise MegaeffError("--measure takes one --method")
    row = measure(args.model, (args.method or ["dense"])[0], args.set, args.rank)
    print(json.dumps(row, indent=2) if args.json else format_measure(row))
    return 0


def _usage_errors_as_one_line(run) -> int:
    """`run()` (its return value, 0 for None); a config mistake (megaeff's errors, Hydra's composition errors:
    an unknown flavor or preset, a bad override) is one `megaeff-estimate-memory: error:` line and exit 2. Any
    other exception is a bug and keeps its traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return run() or 0
    except MegaeffError as exc:
        print(f"megaeff-estimate-memory: error: {exc}", file=sys.stderr)
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"megaeff-estimate-memory: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.measure:
        return _usage_errors_as_one_line(lambda: _main_measure(args))
    if args.paper_formula:
        args.param_dtype, args.state_dtype, args.index_dtype, args.no_grads = "bf16", "bf16", "int64", True
    dtypes = dict(
        param_dtype=args.param_dtype,
        grad_dtype=None if args.no_grads else (args.grad_dtype or args.param_dtype),
        state_dtype=args.state_dtype,
        index_dtype=args.index_dtype,
    )
    methods = args.method or default_methods(args.model)
    rows = []
    code = _usage_errors_as_one_line(lambda: rows.extend(estimate(args.model, m, args.set, **dtypes) for m in methods))
    if code:
        return code
    if args.json:
        print(json.dumps({"settings": dtypes, "rows": rows}, indent=2))
        return 0
    optimizers = "/".join(sorted({str(r["optimizer"]) for r in rows}))
    print(
        f"{args.model}: {optimizers} training state; weights {dtypes['param_dtype']}, "
        f"grads {dtypes['grad_dtype'] or 'none'}, "
        f"states {dtypes['state_dtype']}, indices {dtypes['index_dtype']}"
    )
    print(format_table(rows))
    for r in rows:
        print(f"  {r['preset']}: {r['description']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
