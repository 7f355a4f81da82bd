#!/usr/bin/env python
"""Learning-rate sweep per method at two model sizes: where each method's default `optim.lr` comes from (issue 20).

    OMP_NUM_THREADS=1 python tools/bench/lr_sweep.py --sizes tiny w64 --threads 1 --out lr_sweep.json

Each run trains one method at one LR on the default corpus (same seed, so the same samples in the same order for
every run) and scores the validation loss on the same `--eval-batches` held-out batches. Every method runs with its
own non-LR recipe (RECIPES below: clipping and weight decay where its paper differs from `conf/optim/adamw.yaml`),
which is what `conf/method/<name>.yaml` ships as its default, so the LR is tuned under the values a user gets.
When a method's best LR is at an edge of its grid, the grid is extended by one factor-of-2 step on that side (up
to `--max-extend` times), so the reported optimum is inside the swept range. The JSON (`--out`) is rewritten after
every run, so an interrupted sweep keeps what it measured; `--resume` skips the runs already in it. The last line
printed summarizes the best LR per method and size.

Sizes: `tiny` is conf/model/tiny.yaml (dim 128, rank 32: the methods' default presets); `w64` is the same shape at
half width (dim 64, ffn 176, 2 heads of 32, rank 16, SLTrain alpha 4 so that alpha/r stays 0.25).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import compose  # noqa: E402

# Non-LR optimizer values per method, the ones conf/method/<name>.yaml ships (docs/configuration.md). dense and
# lowrank keep conf/optim/adamw.yaml's. SLTrain's scripts train without clipping; LOST's recipe is CoLA's (weight
# decay 0.01, clip 0.5), see /work/shared/research/lost_sltrain.md 1.6 and 2.3.
RECIPES = {
    "dense": [],
    "lowrank": [],
    "sltrain": ["optim.grad_clip=0.0"],
    "lost": ["optim.weight_decay=0.01", "optim.grad_clip=0.5"],
    "galore": [],
}
DEFAULT_LRS = {
    "dense": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],
    "lowrank": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],
    "sltrain": [3e-3, 6e-3, 1e-2, 2e-2, 4e-2],
    "lost": [3e-3, 6e-3, 1e-2, 2e-2, 4e-2],
    "galore": [3e-3, 6e-3, 1e-2, 2e-2, 4e-2],
}
SIZES = {
    "tiny": {"model": ["model=tiny"], "rank": 32, "alpha": 8.0},
    "w64": {"model": ["model=tiny", "model.dim=64", "model.ffn_dim=176", "model.n_heads=2"], "rank": 16, "alpha": 4.0},
}


def method_args(method: str, size: str) -> list:
    """Hydra overrides that select the method (galore: dense layers under optim=galore) at this size's rank."""
    spec = SIZES[size]
    if method == "galore":
        return ["method=dense", "optim=galore", f"optim.galore_rank={spec['rank']}"]
    out = [f"method={method}"]
    if method != "dense":
        out.append(f"method.rank={spec['rank']}")
    if method == "sltrain":
        out.append(f"method.alpha={spec['alpha']}")
    return out + RECIPES[method]


def train_one(method: str, size: str, lr: float, args, run_dir: Path) -> dict:
    from megaeff.distributed.dims import ParallelDims  # here: tests import RECIPES without the training stack
    from megaeff.train.trainer import Trainer

    cfg = compose(
        [
            *SIZES[size]["model"],
            *method_args(method, size),
            f"optim.lr={lr}",
            f"train.steps={args.steps[size]}",
            f"train.micro_batch_size={args.batch}",
            f"data.seq_len={args.seq_len}",
            "train.eval_interval=0",
            f"train.eval_max_batches={args.eval_batches}",
            "train.ckpt_interval=0",
            "train.log_interval=50",
            "train.resume=none",
            "train.plot=false",
            f"train.threads={args.threads}",
            f"run_dir={run_dir}",
            f"name={method}_{size}_lr{lr:g}",
            *args.extra,
        ]
    )
    trainer = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), run_dir)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        val_loss = result.final_eval["val_loss"]
    except Exception as exc:  # a diverged run (non-finite loss) is a result of the sweep, not a failure of it
        val_loss, result = math.inf, None
        print(f"run failed: {exc!r}", flush=True)
    finally:
        trainer.close()
    return {
        "method": method,
        "size": size,
        "lr": lr,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if math.isfinite(val_loss) else math.inf,
        "train_seconds": time.perf_counter() - t0,
        "overrides": method_args(method, size),
    }


def best_of(runs: list, method: str, size: str) -> dict:
    return min((r for r in runs if r["method"] == method and r["size"] == size), key=lambda r: r["val_loss"])


def next_lr(runs: list, method: str, size: str) -> float | None:
    """The LR one factor-of-2 step past the grid's edge when the best LR sits on that edge, else None."""
    lrs = sorted(r["lr"] for r in runs if r["method"] == method and r["size"] == size)
    best = best_of(runs, method, size)["lr"]
    if best == lrs[-1]:
        return lrs[-1] * 2
    if best == lrs[0]:
        return lrs[0] / 2
    return None


def save(args, runs: list) -> None:
    best = {
        f"{m}/{s}": best_of(runs, m, s)["lr"]
        for s in args.sizes
        for m in args.methods
        if any(r["method"] == m and r["size"] == s for r in runs)
    }
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "best_lr": best}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, args.out)


def sweep_one(method: str, size: str, args, runs: list) -> None:
    done = {(r["method"], r["size"], r["lr"]) for r in runs}
    todo = list(args.lrs.get(method) or DEFAULT_LRS[method])
    extended = 0
    while todo:
        lr = todo.pop(0)
        if (method, size, lr) not in done:
            run_dir = args.workdir / f"{method}_{size}_lr{lr:g}"
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "sweep.log", "w") as log, contextlib.redirect_stdout(log):
                r = train_one(method, size, lr, args, run_dir)
            runs.append(r)
            done.add((method, size, lr))
            save(args, runs)
            print(
                f"{method:<8} {size:<5} lr {lr:<8g} val_loss {r['val_loss']:.4f} val_ppl {r['val_ppl']:.3f}"
                f"  ({r['train_seconds']:.0f} s)",
                flush=True,
            )
        if not todo and extended < args.max_extend:
            nxt = next_lr(runs, method, size)
            if nxt is not None:
                todo.append(nxt)
                extended += 1


def print_table(args, runs: list) -> None:
    for size in args.sizes:
        print(f"\nsize {size}: validation loss by LR (best in brackets)")
        for method in args.methods:
            mine = sorted((r for r in runs if r["method"] == method and r["size"] == size), key=lambda r: r["lr"])
            if not mine:
                continue
            best = best_of(runs, method, size)
            cells = [
                f"[{r['lr']:g}: {r['val_loss']:.4f}]" if r is best else f"{r['lr']:g}: {r['val_loss']:.4f}"
                for r in mine
            ]
            print(f"  {method:<8} " + "  ".join(cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "w64"], choices=sorted(SIZES))
    ap.add_argument("--methods", nargs="+", default=["dense", "lowrank", "sltrain", "lost"], choices=sorted(RECIPES))
    ap.add_argument("--steps", type=int, default=300, help="steps per run (both sizes)")
    ap.add_argument("--steps-w64", type=int, default=None, help="steps of the w64 size (default: --steps)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=16, help="held-out batches of train.eval_batch_size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-extend", type=int, default=2, help="grid extensions per method when the best is at an edge")
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR,LR,...", help="replace a method's grid")
    ap.add_argument("--workdir", type=Path, default=Path("runs/lr_sweep"))
    ap.add_argument("--out", type=Path, default=Path("lr_sweep.json"))
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out and skip them")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args(argv)
    args.steps = {"tiny": args.steps, "w64": args.steps_w64 or args.steps}
    args.lrs = {k: [float(x) for x in v.split(",")] for k, v in (item.split("=", 1) for item in args.lr)}
    runs = json.loads(args.out.read_text())["runs"] if args.resume and args.out.is_file() else []
    for size in args.sizes:
        for method in args.methods:
            sweep_one(method, size, args, runs)
    print_table(args, runs)
    save(args, runs)
    summary = ", ".join(f"{m}/{s} {best_of(runs, m, s)['lr']:g}" for s in args.sizes for m in args.methods)
    print(f"wrote {args.out}; best LR per method/size: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
