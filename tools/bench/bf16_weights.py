#!/usr/bin/env python
"""bf16 weights without an fp32 master (`precision.param_dtype=bf16`) against fp32 master weights.

    python tools/bench/bf16_weights.py --steps 300 --out bench_bf16_weights.json

Three runs of the same model, data, seed and bf16 autocast (`precision=bf16`), differing only in how the weights
are stored and updated:
- `fp32 master`: fp32 parameters (the default);
- `bf16 + stochastic rounding`: bf16 parameters, each update computed on an fp32 copy of one parameter and written
  back with stochastic rounding (megaeff/optim/per_param.py);
- `bf16 round-to-nearest`: the same, but written back with round-to-nearest (the bf16 AdamW update without a
  master copy): the control that shows what stochastic rounding buys.
Prints the final validation loss, the loss at a few steps, and the bytes of weights, gradients and optimizer
state; writes JSON with the whole loss curves. Add `--method lost` etc. and `--set precision=coat ...` to compare
on top of other settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megaeff.distributed.dims import ParallelDims  # noqa: E402
from megaeff.train.perf import state_memory  # noqa: E402
from megaeff.train.trainer import Trainer  # noqa: E402
from tools.bench.common import compose  # noqa: E402

VARIANTS = {
    "fp32 master": ([], True),
    "bf16 + stochastic rounding": (["precision.param_dtype=bf16"], True),
    "bf16 round-to-nearest": (["precision.param_dtype=bf16"], False),
}


def run_variant(name: str, args, run_dir: Path) -> dict:
    overrides, stochastic = VARIANTS[name]
    cfg = compose(
        [
            f"model={args.model}",
            f"method={args.method}",
            "precision=bf16",
            f"optim.lr={args.lr}",
            f"train.steps={args.steps}",
            f"train.micro_batch_size={args.batch}",
            f"data.seq_len={args.seq_len}",
            "train.eval_interval=0",
            "train.ckpt_interval=0",
            f"train.log_interval={args.steps}",
            "train.resume=none",
            "train.plot=false",
            f"train.threads={args.threads}",
            f"run_dir={run_dir}",
            *overrides,
            *args.set,
        ]
    )
    trainer = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), run_dir)
    if not stochastic:
        trainer.optimizer.stochastic_rounding = False  # the control: same per-parameter path, nearest rounding
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    trainer.cfg.train.eval_max_batches = None  # the whole held-out split
    final = trainer.evaluate()
    mem = state_memory(trainer.model, trainer.optimizer)
    trainer.close()
    return {"variant": name, "val_loss": final["val_loss"], "losses": result.losses, "seconds": wall, **mem}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--method", default="dense")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="extra Hydra override for every variant")
    ap.add_argument("--out", default="bench_bf16_weights.json")
    ap.add_argument("--work", default="/tmp/megaeff_bench_bf16")
    args = ap.parse_args(argv)
    rows = [run_variant(v, args, Path(args.work) / str(i)) for i, v in enumerate(VARIANTS)]
    base = rows[0]["val_loss"]
    marks = sorted({max(1, args.steps // 10), args.steps // 2, args.steps})
    print(f"{args.model} / {args.method}, {args.steps} steps, lr {args.lr:g}, batch {args.batch} x {args.seq_len}")
    print("| weights | final val loss | vs fp32 master | " + " | ".join(f"loss @{m}" for m in marks) + " | weights | "
          "grads | optimizer state |")  # fmt: skip
    print("|---" * (6 + len(marks)) + "|")
    for r in rows:
        losses = " | ".join(f"{r['losses'][m - 1]:.4f}" for m in marks)
        print(
            f"| {r['variant']} | {r['val_loss']:.4f} | {100 * (r['val_loss'] / base - 1):+.2f}% | {losses} | "
            f"{r['mem_params_bytes'] / 1e6:.2f} MB | {r['mem_grads_bytes'] / 1e6:.2f} MB | "
            f"{r['mem_optim_bytes'] / 1e6:.2f} MB |"
        )
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
