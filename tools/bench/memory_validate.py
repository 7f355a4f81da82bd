#!/usr/bin/env python
"""Validate the whole-step memory tracker: the fake-tensor peak against live-tensor peaks of the real CPU step.

    python tools/bench/memory_validate.py --out bench_memory_validate.json
    python tools/bench/memory_validate.py --models tiny --methods dense --quick

For every case (model x method x precision x activation checkpointing; one rank, train.micro_batch_size and
data.seq_len as given) three numbers of the same training step (StepRunner.run: forward, backward, clipping,
optimizer; megaeff/train/memory/):
- fake: StepMemoryTracker on fake tensors (`megaeff-estimate-memory --measure`);
- real: StepMemoryTracker on the real CPU step (same accounting, real tensors);
- torch: torch.distributed._tools.mem_tracker.MemTracker on the real CPU step, the independent reference: torch's
  own live-storage tracker, which shares no code with ours (it also wraps UntypedStorage.resize_ and counts
  each storage once by weak reference, at the peak after each op).
All three are live tensor bytes (no allocator rounding or cache), so they should agree to the byte; the table
prints the differences in bytes and percent, and the JSON keeps each case's breakdown at the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megaeff.cli.estimate_memory import default_methods  # noqa: E402
from megaeff.config import compose  # noqa: E402
from megaeff.train.memory.fake_step import measure_step, reference_peak  # noqa: E402

PRECISIONS = {"fp32": ["precision=fp32"], "coat": ["precision=coat"]}


def methods_for(model: str, wanted):
    """(preset, extra overrides) per method: the size's preset where one exists (llama_60m -> sltrain_60m), else
    the generic one; SLTrain on both compute paths (densify, the one its preset picks at the paper's sizes, and
    sparse CSR, which torch's MemTracker cannot follow)."""
    presets = default_methods(model)
    out = []
    for m in wanted:
        preset = next((p for p in presets if p == m or p.startswith(m + "_")), m)
        if m == "sltrain":
            out += [(preset, ["method.sltrain_path=dense"]), (preset, ["method.sltrain_path=sparse"])]
        else:
            out.append((preset, []))
    return out


def run_case(model, method, extra, precision, ac, common):
    sets = [
        f"model={model}",
        f"method={method}",
        *extra,
        *PRECISIONS[precision],
        f"train.activation_checkpointing={ac}",
    ]
    cfg = compose(sets + common)
    t0 = time.perf_counter()
    fake = measure_step(cfg)
    t_fake = time.perf_counter() - t0
    real = measure_step(cfg, fake=False)
    ref = reference_peak(cfg)
    return {
        "model": model,
        "method": method + "".join(f" ({e.split('=')[1]})" for e in extra),
        "precision": precision,
        "ac": ac,
        "overrides": sets + common,
        "fake_peak": fake.peak_bytes,
        "real_peak": real.peak_bytes,
        "torch_peak": ref["Total"] if ref else None,
        "fake_s": t_fake,
        "fake": fake.as_dict(),
        "real": real.as_dict(),
        "torch": ref,
    }


def table(rows):
    head = (
        "| model | method | precision | AC | fake peak (B) | real peak, ours (B) | real peak, torch MemTracker (B) "
        "| fake - torch | phase |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["torch_peak"] is None:
            d = r["fake_peak"] - r["real_peak"]
            ref, diff = "n/a (sparse CSR)", f"{d:+,} vs ours real ({100 * d / r['real_peak']:+.3f}%)"
        else:
            d = r["fake_peak"] - r["torch_peak"]
            ref, diff = f"{r['torch_peak']:,}", f"{d:+,} ({100 * d / r['torch_peak']:+.3f}%)"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['precision']} | {'on' if r['ac'] else 'off'} | {r['fake_peak']:,} | "
            f"{r['real_peak']:,} | {ref} | {diff} | {r['fake']['phase']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "llama_20m", "llama_60m"])
    p.add_argument("--methods", nargs="+", default=["dense", "sltrain", "lost"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "coat"], choices=sorted(PRECISIONS))
    p.add_argument("--ac", nargs="+", default=["false", "true"], choices=["false", "true"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every case")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    common = [f"train.micro_batch_size={args.micro_batch}", f"data.seq_len={args.seq_len}", *args.set]
    rows = []
    for model in args.models:
        for method, extra in methods_for(model, args.methods):
            for precision in args.precisions:
                for ac in args.ac:
                    rows.append(run_case(model, method, extra, precision, ac == "true", common))
                    r = rows[-1]
                    print(
                        f"{model} {r['method']} {precision} ac={ac}: fake {r['fake_peak']:,} real {r['real_peak']:,} "
                        f"torch {r['torch_peak']} ({r['fake_s']:.1f} s fake)",
                        flush=True,
                    )
    print(table(rows))
    checked = [r for r in rows if r["torch_peak"] is not None]
    worst = max((abs(r["fake_peak"] - r["torch_peak"]) / r["torch_peak"] for r in checked), default=0.0)
    worst_ours = max(abs(r["fake_peak"] - r["real_peak"]) / r["real_peak"] for r in rows)
    print(
        f"largest |fake - torch| / torch: {100 * worst:.4f}% over {len(checked)} cases; "
        f"largest |fake - real (ours)| / real: {100 * worst_ours:.4f}% over {len(rows)} cases"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"common": common, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
