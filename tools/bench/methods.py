#!/usr/bin/env python
"""Dense vs low-rank vs SLTrain vs LOST on the same data, steps and tokens.

    python tools/bench/methods.py --steps 300 --lrs 1e-3 3e-3 1e-2 --out bench_methods.json --png bench_methods.png

Three phases, all on this machine:
1. Work: linear-layer multiply-adds per token of each method at the llama_60m shapes (counted from the layers).
2. Speed: tokens/s of a training step (forward, backward, AdamW) at the llama_60m shapes with the byte vocabulary,
   methods interleaved over `--speed-rounds` rounds, median step time.
3. Quality: each method trains the `--model` flavor on the default corpus for `--steps` steps at every LR of the
   sweep (same seed, so the same samples in the same order); the best LR by final validation perplexity (the whole
   held-out split) is reported, with parameter count and training-state bytes (weights, grads, AdamW, indices).
Prints a table, writes JSON and a PNG of the best runs' curves.

`--precisions` runs the quality phase once per precision preset (conf/precision/), e.g. COAT on top of BF16
against BF16 (issue 17: FP8 GEMMs in the compact layers):

    OMP_NUM_THREADS=1 python tools/bench/methods.py --methods lost --lrs 3e-3 --speed-rounds 0 --steps 300 \
        --batch 4 --seq-len 128 --threads 1 --final-eval-batches 64 --precisions bf16 coat_bf16 \
        --workdir runs/bench_coat_lost --out bench_coat_lost.json --png bench_coat_lost.png

and reports, per method, each precision's validation loss relative to the first one's (at that precision's
best LR). `--speed-rounds 0` skips the speed phase.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megaeff.cli.plot_runs import plot_runs  # noqa: E402
from megaeff.distributed.dims import ParallelDims  # noqa: E402
from megaeff.layers.linear import linear_macs_per_token  # noqa: E402
from megaeff.models.init import materialize  # noqa: E402
from megaeff.models.llama import build_llama, count_params  # noqa: E402
from megaeff.train.perf import state_memory  # noqa: E402
from megaeff.train.trainer import Trainer  # noqa: E402
from tools.bench.common import compose  # noqa: E402

METHODS = ("dense", "lowrank", "sltrain", "lost")


def method_overrides(method: str, size: str = ""):
    return [f"method={method}{'_' + size if size and method != 'dense' else ''}"]


def count_work(method: str) -> dict:
    cfg = compose(["model=llama_60m", *method_overrides(method, "60m")])
    model = build_llama(cfg.model, cfg.method, device="meta")
    return {"params_60m": count_params(model), "linear_macs_per_token_60m": linear_macs_per_token(model, 256 * 256)}


def measure_speed(rounds: int, batch: int, seq_len: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    setups = {}
    for method in METHODS:
        cfg = compose(["model=llama_60m", "model.vocab_size=264", *method_overrides(method, "60m")])
        model = materialize(build_llama(cfg.model, cfg.method, "meta"), torch.device("cpu"), 0, cfg.model.init_std)
        setups[method] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True))
    tokens = torch.randint(0, 257, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    times = {m: [] for m in METHODS}
    for r in range(rounds + 1):  # round 0 warms up
        for method, (model, opt) in setups.items():
            t0 = time.perf_counter()
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:
                times[method].append(time.perf_counter() - t0)
    return {m: batch * seq_len / statistics.median(t) for m, t in times.items()}


def train_one(method: str, lr: float, args, run_dir: Path, precision: str = "fp32") -> dict:
    cfg = compose(
        [
            f"model={args.model}",
            *method_overrides(method),
            f"precision={precision}",
            f"optim.lr={lr}",
            f"train.steps={args.steps}",
            f"optim.warmup_steps={max(args.steps // 10, 1)}",
            f"train.micro_batch_size={args.batch}",
            f"data.seq_len={args.seq_len}",
            "train.eval_interval=50",
            "train.eval_max_batches=8",
            "train.ckpt_interval=0",
            "train.log_interval=10",
            "train.resume=none",
            "train.plot=false",
            f"train.threads={args.threads}",
            f"run_dir={run_dir}",
            f"name={method}_{precision}_lr{lr:g}",
            *args.extra,
        ]
    )
    trainer = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), run_dir)
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    # The final number covers the whole held-out split unless --final-eval-batches caps it (the same batches for
    # every run, so runs compare paired).
    trainer.cfg.train.eval_max_batches = args.final_eval_batches
    final = trainer.evaluate()
    mem = state_memory(trainer.model, trainer.optimizer)
    trainer.close()
    return {
        "method": method,
        "precision": precision,
        "lr": lr,
        "val_ppl": final["val_ppl"],
        "val_loss": final["val_loss"],
        "params": trainer.n_params,
        "state_bytes": sum(mem.values()),
        **mem,
        "train_seconds": wall,
        "run_dir": str(run_dir),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--speed-rounds", type=int, default=5)
    ap.add_argument("--speed-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_methods"))
    ap.add_argument("--out", type=Path, default=Path("bench_methods.json"))
    ap.add_argument("--png", type=Path, default=Path("bench_methods.png"))
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every quality run")
    ap.add_argument("--final-eval-batches", type=int, default=None, help="cap the final evaluation (default: all)")
    ap.add_argument(
        "--precisions", nargs="+", default=["fp32"], help="precision presets (conf/precision/) of the quality runs"
    )
    args = ap.parse_args(argv)

    work = {m: count_work(m) for m in METHODS}
    print(
        "linear MACs/token at llama_60m: "
        + ", ".join(
            f"{m} {w['linear_macs_per_token_60m'] / 1e6:.2f}M "
            f"({w['linear_macs_per_token_60m'] / work['dense']['linear_macs_per_token_60m']:.3f}x)"
            for m, w in work.items()
        ),
        flush=True,
    )
    speed = {}
    if args.speed_rounds > 0:
        speed = measure_speed(args.speed_rounds, args.speed_batch, args.seq_len, args.threads)
        print("tokens/s at llama_60m shapes: " + ", ".join(f"{m} {v:.0f}" for m, v in speed.items()), flush=True)

    runs = []
    args.workdir.mkdir(parents=True, exist_ok=True)
    for precision in args.precisions:
        for method in args.methods:
            for lr in args.lrs:
                tag = method if precision == "fp32" else f"{method}_{precision}"
                run_dir = args.workdir / f"{tag}_lr{lr:g}"
                with open(f"{run_dir}.log", "w") as log, contextlib.redirect_stdout(log):
                    r = train_one(method, lr, args, run_dir, precision)
                runs.append(r)
                print(
                    f"{method:<8} {precision:<10} lr {lr:<7g} val_loss {r['val_loss']:.4f} val_ppl {r['val_ppl']:.3f}"
                    f"  ({r['train_seconds']:.0f} s)",
                    flush=True,
                )

    best = {
        (m, p): min((r for r in runs if r["method"] == m and r["precision"] == p), key=lambda r: r["val_ppl"])
        for p in args.precisions
        for m in args.methods
    }
    print_table(best, work, speed, args.precisions)
    plot_runs(
        [Path(r["run_dir"]) for r in best.values()],
        args.png,
        [f"{m} {p} (lr {r['lr']:g})" for (m, p), r in best.items()],
    )
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "work": work,
                "tokens_per_s_60m": speed,
                "runs": runs,
                "best": {f"{m}/{p}": r["lr"] for (m, p), r in best.items()},
                "val_loss_rel_diff": rel_diffs(best, args.precisions),
            },
            indent=1,
        )
    )
    print(f"wrote {args.out} and {args.png}")
    return 0


def rel_diffs(best: dict, precisions) -> dict:
    """Per method and precision: (val_loss - val_loss at the first precision) / val_loss at the first precision."""
    base = precisions[0]
    return {
        f"{m}/{p}": (r["val_loss"] - best[(m, base)]["val_loss"]) / best[(m, base)]["val_loss"]
        for (m, p), r in best.items()
        if p != base
    }


def print_table(best: dict, work: dict, speed: dict, precisions) -> None:
    diffs = rel_diffs(best, precisions)
    header = (
        f"{'method':<8}{'precision':>11}{'best lr':>9}{'val loss':>10}{'vs ' + precisions[0]:>14}{'val ppl':>9}"
        f"{'params':>10}{'state MB':>10}{'lin MACs/tok 60m':>18}{'vs dense':>9}{'tok/s 60m':>11}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    dense_macs = work["dense"]["linear_macs_per_token_60m"]
    for (m, p), r in best.items():
        macs = work[m]["linear_macs_per_token_60m"]
        diff = diffs.get(f"{m}/{p}")
        print(
            f"{m:<8}{p:>11}{r['lr']:>9g}{r['val_loss']:>10.4f}{'' if diff is None else f'{diff:+.3%}':>14}"
            f"{r['val_ppl']:>9.3f}{r['params'] / 1e6:>9.3f}M{r['state_bytes'] / 2**20:>10.2f}"
            f"{macs / 1e6:>17.2f}M{macs / dense_macs:>9.3f}{f'{speed[m]:.0f}' if m in speed else '-':>11}"
        )


if __name__ == "__main__":
    sys.exit(main())
