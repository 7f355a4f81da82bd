#!/usr/bin/env python
"""Peak memory of one training step, SLTrain-Figure-3 style: full-rank AdamW vs SLTrain vs LOST (+ COAT, + all).

    python tools/bench/memory.py --out bench_memory.json
    python tools/bench/memory.py --sizes 7b --seq-len 2048

Each cell is `megaeff-estimate-memory --measure` (megaeff/train/memory/): one real training step (forward,
backward, clipping, optimizer) of one device on fake tensors, its peak of live tensor bytes (GB = 1e9) and the
breakdown at the peak. No allocator cache, CUDA context or kernel workspace is included (SLTrain's Figure 3 is
`torch.cuda.max_memory_allocated`-like, so it also counts allocator rounding). Columns are override lists
(`COLUMNS`); an override the config does not know yet is left out of its column and named in the notes.
Sizes: conf/model/llama_{350m,1b,7b} with their method presets (sltrain_7b, lost_7b, ...), sequence 256 and
micro-batch 1 (SLTrain's 4.5 GB for 350M full-rank Adam leaves no room for more activations), 7B also at
sequence 2048.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megaeff.config import compose, conf_dir  # noqa: E402
from megaeff.train.memory.fake_step import measure_step  # noqa: E402
from megaeff.train.memory.tracker import CATEGORIES  # noqa: E402

COAT = "coat_bf16" if (Path(conf_dir()) / "precision" / "coat_bf16.yaml").exists() else "coat"
# SLTrain with FP8-class moments only (its paper: 8-bit Adam): COAT's preset with only fp8_optimizer_states.
ONLY_FP8_STATES = ["precision.fp8_activations=false", "precision.fp8_gemm=false"]
# (label, method family, overrides); the family's preset for the size is taken (lost -> lost_7b). Every column
# adds COMMON: torch AdamW's fused kernel, what `optim.impl=auto` picks on CUDA (on the CPU, auto picks foreach,
# whose whole-model temporaries would put a full fp32 model copy on top of the optimizer step's peak).
COMMON = ["optim.impl=fused"]
COLUMNS: List[Tuple[str, str, List[str]]] = [
    ("full-rank AdamW bf16", "dense", ["precision=bf16"]),
    # bf16 weights and gradients (no fp32 master), fp32 moments: the paper's Adam column keeps bf16 weights.
    ("full-rank AdamW, bf16 weights", "dense", ["precision=bf16", "precision.param_dtype=bf16"]),
    ("SLTrain bf16 (FP8 moments)", "sltrain", [f"precision={COAT}", *ONLY_FP8_STATES]),
    ("LOST bf16", "lost", ["precision=bf16"]),
    ("LOST + COAT", "lost", [f"precision={COAT}"]),
    (
        "LOST + COAT + all",
        "lost",
        [
            f"precision={COAT}",
            "precision.param_dtype=bf16",
            "optim.in_backward=true",
            "train.activation_checkpointing=true",
        ],
    ),
]
SHORT = {
    "parameters": "params",
    "buffers": "buffers",
    "gradients": "grads",
    "optimizer_state": "optim",
    "comm_buffers": "comm",
    "activations": "saved act",
    "temporaries": "temp",
}


def known_overrides(base: List[str], overrides: List[str]) -> Tuple[List[str], List[str]]:
    """(the overrides the config accepts, those it does not know yet)."""
    ok, skipped = [], []
    for o in overrides:
        try:
            compose(base + ok + [o])
            ok.append(o)
        except Exception as exc:  # an unknown key or option: Hydra's errors carry the key
            skipped.append(f"{o} ({type(exc).__name__})")
    return ok, skipped


def preset(family: str, size: str) -> str:
    name = f"{family}_{size}"
    return name if family != "dense" and (Path(conf_dir()) / "method" / f"{name}.yaml").exists() else family


def cell(size: str, seq: int, micro: int, family: str, overrides: List[str]) -> Dict:
    base = [f"model=llama_{size}", f"method={preset(family, size)}"]
    base += [f"data.seq_len={seq}", f"train.micro_batch_size={micro}"]
    ok, skipped = known_overrides(base, COMMON + overrides)
    t0 = time.perf_counter()
    report = measure_step(compose(base + ok))
    return {
        "overrides": base + ok,
        "skipped": skipped,
        "seconds": time.perf_counter() - t0,
        **report.as_dict(),
    }


def markdown(rows: List[Dict]) -> str:
    labels = [c[0] for c in COLUMNS]
    out = ["| model | seq x micro-batch | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for r in rows:
        cells = [f"{r['cells'][lab]['peak_gb']:.2f} GB" if lab in r["cells"] else "not run" for lab in labels]
        out.append(f"| {r['model']} | {r['seq']} x {r['micro']} | " + " | ".join(cells) + " |")
    out += ["", "Breakdown at the peak (GB) and the phase of the peak:", ""]
    out.append("| model | seq | column | phase | " + " | ".join(SHORT[c] for c in CATEGORIES) + " |")
    out.append("|---|---|---|---|" + "---|" * len(CATEGORIES))
    for r in rows:
        for lab in [lab for lab in labels if lab in r["cells"]]:
            c = r["cells"][lab]
            parts = " | ".join(f"{c['breakdown'][k] / 1e9:.2f}" for k in CATEGORIES)
            out.append(f"| {r['model']} | {r['seq']} | {lab} | {c['phase']} | {parts} |")
    notes = sorted(
        {
            f"{lab}: not applied, unknown to the config: {s}"
            for r in rows
            for lab, c in r["cells"].items()
            for s in c["skipped"]
        }
    )
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["350m", "1b", "7b"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--long", nargs=2, type=int, default=[2048, 1], metavar=("SEQ", "MICRO"), help="7B also at this")
    p.add_argument("--out", default=None)
    p.add_argument("--from-json", nargs="+", default=None, help="print the table of earlier runs' JSON files")
    p.add_argument("--columns", nargs="+", default=None, help="run only the columns with these labels")
    args = p.parse_args(argv)
    if args.from_json:
        print(markdown([r for f in args.from_json for r in json.loads(Path(f).read_text())["rows"]]))
        return 0
    warnings.filterwarnings("ignore")
    shapes = [(s, args.seq_len, args.micro_batch) for s in args.sizes]
    if "7b" in args.sizes and tuple(args.long) != (args.seq_len, args.micro_batch):
        shapes.append(("7b", *args.long))
    rows = []
    for size, seq, micro in shapes:
        row = {"model": f"llama_{size}", "seq": seq, "micro": micro, "cells": {}}
        for label, family, overrides in COLUMNS:
            if args.columns and label not in args.columns:
                continue
            c = row["cells"][label] = cell(size, seq, micro, family, overrides)
            print(
                f"llama_{size} seq {seq} x {micro} {label}: {c['peak_gb']:.3f} GB ({c['phase']}, {c['seconds']:.0f} s)",
                flush=True,
            )
            if args.out:  # after every cell: a long run keeps what it measured
                Path(args.out).write_text(json.dumps({"columns": COLUMNS, "rows": rows + [row]}, indent=2))
        rows.append(row)
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"columns": COLUMNS, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
