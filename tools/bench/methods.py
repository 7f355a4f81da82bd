#!/usr/bin/env python
"""Dense vs low-rank vs GaLore vs SLTrain vs LOST on the same data, steps and tokens, over seeds and corpora.

    python tools/bench/methods.py --steps 300 --seeds 1 2 3 --corpora default pydocs \
        --out bench_methods.json --png bench_methods.png

Three phases, all on this machine:
1. Work: linear-layer multiply-adds per token of each method at the llama_60m shapes (counted from the layers).
2. Speed: tokens/s of a training step (forward, backward, AdamW) at the llama_60m shapes with the byte vocabulary,
   methods interleaved over `--speed-rounds` rounds, median step time.
3. Quality: each method trains the `--model` flavor on each corpus of `--corpora` (data groups: conf/data/) for
   `--steps` steps, once per seed of `--seeds` (`train.seed`: initialization and sample order; a seed gives every
   method the same samples in the same order, so differences between methods are paired by seed). Without `--lrs`
   each method runs at its own defaults (conf/method_optim/, what `megaeff-train method=...` uses); with `--lrs`
   at every LR, and the LR with the lowest mean final perplexity is reported. Final validation perplexity covers
   the whole held-out split unless `--final-eval-batches` caps it. Reported per method: mean and sample std over
   seeds, the paired difference to dense with its 95% t-interval, parameter count and training-state bytes
   (weights, grads, optimizer state with GaLore's projectors, indices).
Prints a table, writes JSON, a PNG of the chosen runs' curves per corpus (`--png`: perplexity against tokens,
mean and min-max over seeds) and one of perplexity against training-state bytes (`<png stem>_memory.png`).
GaLore is `method=dense optim=galore` (full-rank weights, projected moments).

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

from megaeff.distributed.dims import ParallelDims  # noqa: E402
from megaeff.layers.linear import linear_macs_per_token  # noqa: E402
from megaeff.models.init import materialize  # noqa: E402
from megaeff.models.llama import build_llama, count_params  # noqa: E402
from megaeff.train.perf import state_memory  # noqa: E402
from megaeff.train.trainer import Trainer  # noqa: E402
from tools.bench.common import compose  # noqa: E402
from tools.bench.methods_plots import plot_curves, plot_memory  # noqa: E402

METHODS = ("dense", "lowrank", "galore", "sltrain", "lost")
LINEAR_METHODS = ("dense", "lowrank", "sltrain", "lost")  # GaLore is dense's model with another optimizer
# Two-sided 95% t quantiles by degrees of freedom, for the paired differences to dense over a few seeds.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def method_overrides(method: str, size: str = ""):
    if method == "galore":
        return ["method=dense", "optim=galore"]
    return [f"method={method}{'_' + size if size and method != 'dense' else ''}"]


def count_work(method: str) -> dict:
    cfg = compose(["model=llama_60m", *method_overrides("dense" if method == "galore" else method, "60m")])
    model = build_llama(cfg.model, cfg.method, device="meta")
    return {"params_60m": count_params(model), "linear_macs_per_token_60m": linear_macs_per_token(model, 256 * 256)}


def measure_speed(rounds: int, batch: int, seq_len: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    setups = {}
    for method in LINEAR_METHODS:
        cfg = compose(["model=llama_60m", "model.vocab_size=264", *method_overrides(method, "60m")])
        model = materialize(build_llama(cfg.model, cfg.method, "meta"), torch.device("cpu"), 0, cfg.model.init_std)
        setups[method] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True))
    tokens = torch.randint(0, 257, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    times = {m: [] for m in LINEAR_METHODS}
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


def quality_config(method: str, lr, args, run_dir: Path, precision: str = "fp32", corpus: str = "default", seed=None):
    """The config of one quality run; `lr` None: the method's own optimizer defaults, untouched (warmup included)."""
    optim = [] if lr is None else [f"optim.lr={lr}", f"optim.warmup_steps={max(args.steps // 10, 1)}"]
    return compose(
        [
            f"model={args.model}",
            *method_overrides(method),
            f"precision={precision}",
            f"data={corpus}",
            *optim,
            *([] if seed is None else [f"train.seed={seed}"]),
            f"train.steps={args.steps}",
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
            f"name={run_dir.name}",
            *args.extra,
        ]
    )


def train_one(method: str, lr, args, run_dir: Path, precision: str = "fp32", corpus: str = "default", seed=None):
    """One quality run (`quality_config`): train, then evaluate on the held-out split."""
    cfg = quality_config(method, lr, args, run_dir, precision, corpus, seed)
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
        "corpus": corpus,
        "seed": cfg.train.seed,
        "lr": cfg.optim.lr,
        "val_ppl": final["val_ppl"],
        "val_loss": final["val_loss"],
        "params": trainer.n_params,
        "state_bytes": sum(mem.values()),
        **mem,
        "train_seconds": wall,
        "run_dir": str(run_dir),
    }


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="LR sweep (default: each method's own)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[None], help="train.seed values (default: the config's)")
    ap.add_argument("--corpora", nargs="+", default=["default"], help="data groups (conf/data/), e.g. default pydocs")
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
    return ap.parse_args(argv)


def run_quality(args) -> list:
    """Every (precision, corpus, method, LR, seed) run, one log file each; a line per run as it finishes."""
    runs = []
    args.workdir.mkdir(parents=True, exist_ok=True)
    for precision in args.precisions:
        for corpus in args.corpora:
            for method in args.methods:
                for lr in args.lrs or [None]:
                    for seed in args.seeds:
                        tag = "_".join(
                            x
                            for x in (
                                corpus,
                                method,
                                "" if precision == "fp32" else precision,
                                "" if lr is None else f"lr{lr:g}",
                                "" if seed is None else f"s{seed}",
                            )
                            if x
                        )
                        run_dir = args.workdir / tag
                        with open(f"{run_dir}.log", "w") as log, contextlib.redirect_stdout(log):
                            r = train_one(method, lr, args, run_dir, precision, corpus, seed)
                        runs.append(r)
                        print(
                            f"{corpus:<8} {method:<8} {precision:<10} lr {r['lr']:<7g} seed {r['seed']:<6} "
                            f"val_loss {r['val_loss']:.4f} val_ppl {r['val_ppl']:.3f}  ({r['train_seconds']:.0f} s)",
                            flush=True,
                        )
    return runs


def choose(runs: list) -> dict:
    """(corpus, method, precision) -> the runs (one per seed) of its LR with the lowest mean final perplexity."""
    by_lr: dict = {}
    for r in runs:
        by_lr.setdefault((r["corpus"], r["method"], r["precision"]), {}).setdefault(r["lr"], []).append(r)
    return {k: min(lrs.values(), key=lambda rs: statistics.fmean(x["val_ppl"] for x in rs)) for k, lrs in by_lr.items()}


def summarize(chosen: dict) -> dict:
    """Mean, sample std and, against dense on the same corpus and precision, the seed-paired difference of final
    perplexity with its 95% t-interval (None where dense or a second seed is missing)."""
    out = {}
    for (corpus, method, precision), rs in chosen.items():
        ppl = [r["val_ppl"] for r in rs]
        row = {"lr": rs[0]["lr"], "n": len(ppl), "ppl_mean": statistics.fmean(ppl)}
        row["ppl_std"] = statistics.stdev(ppl) if len(ppl) > 1 else None
        dense = {r["seed"]: r["val_ppl"] for r in chosen.get((corpus, "dense", precision), [])}
        diffs = [r["val_ppl"] - dense[r["seed"]] for r in rs if r["seed"] in dense]
        row["vs_dense"] = None
        if method != "dense" and len(diffs) > 1:
            half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
            mean = statistics.fmean(diffs)
            row["vs_dense"] = {"mean": mean, "ci95": [mean - half, mean + half], "significant": abs(mean) > half}
        out[(corpus, method, precision)] = row
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    work = {m: count_work(m) for m in args.methods}
    if "dense" not in work:
        work["dense"] = count_work("dense")
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

    runs = run_quality(args)
    chosen = choose(runs)
    summary = summarize(chosen)
    print_table(chosen, summary, work, speed, args.precisions)
    groups: dict = {}
    for (corpus, method, precision), rs in chosen.items():
        label = method if precision == args.precisions[0] else f"{method} {precision}"
        groups.setdefault(corpus, {})[label] = rs
    plot_curves(groups, args.batch * args.seq_len, args.png)
    mem_png = args.png.with_name(f"{args.png.stem}_memory{args.png.suffix}")
    plot_memory(groups, mem_png)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "work": work,
                "tokens_per_s_60m": speed,
                "runs": runs,
                "summary": {"/".join(k): v for k, v in summary.items()},
                "val_loss_rel_diff": rel_diffs(chosen, args.precisions),
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}, {args.png} and {mem_png}")
    return 0


def rel_diffs(chosen: dict, precisions) -> dict:
    """Per corpus and method: (mean val_loss - the first precision's) / the first precision's."""
    base = precisions[0]

    def loss(k):
        return statistics.fmean(r["val_loss"] for r in chosen[k])

    return {
        "/".join(k): (loss(k) - loss((k[0], k[1], base))) / loss((k[0], k[1], base))
        for k in chosen
        if k[2] != base and (k[0], k[1], base) in chosen
    }


def print_table(chosen: dict, summary: dict, work: dict, speed: dict, precisions) -> None:
    diffs = rel_diffs(chosen, precisions)
    header = (
        f"{'corpus':<9}{'method':<8}{'precision':>10}{'lr':>8}{'n':>3}{'val ppl mean +-std':>22}"
        f"{'vs dense (95% CI)':>30}{'loss vs ' + precisions[0]:>16}{'params':>10}{'state MB':>10}"
        f"{'MACs/tok 60m':>14}{'tok/s 60m':>11}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    dense_macs = work["dense"]["linear_macs_per_token_60m"]
    for (corpus, m, p), rs in chosen.items():
        s = summary[(corpus, m, p)]
        std = "" if s["ppl_std"] is None else f"+-{s['ppl_std']:.3f}"
        vs = s["vs_dense"]
        vs_txt = "" if vs is None else f"{vs['mean']:+.3f} [{vs['ci95'][0]:+.3f},{vs['ci95'][1]:+.3f}]"
        diff = diffs.get(f"{corpus}/{m}/{p}")
        print(
            f"{corpus:<9}{m:<8}{p:>10}{s['lr']:>8g}{s['n']:>3}{s['ppl_mean']:>12.3f}{std:>10}{vs_txt:>30}"
            f"{'' if diff is None else f'{diff:+.3%}':>16}{rs[0]['params'] / 1e6:>9.3f}M"
            f"{rs[0]['state_bytes'] / 2**20:>10.2f}{work[m]['linear_macs_per_token_60m'] / dense_macs:>13.3f}x"
            f"{f'{speed[m]:.0f}' if m in speed else '-':>11}"
        )


if __name__ == "__main__":
    sys.exit(main())
