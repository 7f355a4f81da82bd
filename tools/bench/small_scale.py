#!/usr/bin/env python
"""GaLore/SLTrain/LOST's comparison table, reproduced at small scale: dense, lowrank, GaLore, SLTrain and LOST at
llama_20m shapes with a byte-level BPE trained on the corpus, the same tokens for every method.

    OMP_NUM_THREADS=2 python tools/bench/small_scale.py --budget-minutes 50 --out small_scale.json

1. Tokenizer: a byte-level BPE (megaeff/data/bpe.py) trained on the corpus's TRAINING documents only (the
   `data.valid_docs` held out), `--vocab-size` ids; the model's vocabulary is set to the tokenizer's.
2. Steps: `--steps`, or calibrated so that everything fits `--budget-minutes`: each method builds its trainer and
   times `--calib-steps` training steps (after one warm-up step) and two evaluation batches; the step count is the
   largest that fits the time left, with every method's set-up and evaluations counted, times `--safety`.
3. Training: tools/bench/methods.py's `train_one` per method (its own optimizer defaults, conf/method_optim/),
   the same seed, so the same samples in the same order, and the same steps. The rank is the papers' width
   ratio at 60M (r = dim/4: 128 of 512), i.e. 64 at llama_20m (dim 256); SLTrain keeps its 60M scale alpha/r = 0.25
   (alpha 16); GaLore projects to rank 64 with its scale 0.25 and gap 200.
4. Table (the papers' layout: a row per method): validation perplexity over the whole held-out split (BPE tokens),
   bits per byte (total validation loss / ln 2 / the UTF-8 bytes the scored tokens stand for: comparable across
   tokenizers), parameters, training-state bytes (methods.py's accounting: fp32 weights, grads, optimizer state
   with GaLore's projector, index buffers) and their ratio to dense, and the published LLaMA-60M perplexity and
   memory (C4, 1.1B tokens; shared/research/lost_sltrain.md) with its source tag. The last line is the summary.
   `--curve-points N` adds N capped evaluations per run and a PNG of perplexity against tokens (off by default:
   on 2 CPU cores each costs a few training steps).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megaeff.data.bpe import token_byte_lengths, train_bpe  # noqa: E402
from megaeff.data.builder import CORPORA  # noqa: E402
from megaeff.distributed.dims import ParallelDims  # noqa: E402
from megaeff.errors import MegaeffError  # noqa: E402
from megaeff.train.trainer import Trainer  # noqa: E402
from tools.bench.common import compose  # noqa: E402
from tools.bench.methods import METHODS, quality_config, train_one  # noqa: E402
from tools.bench.methods_plots import plot_curves  # noqa: E402

# Published LLaMA-60M numbers (C4, 1.1B tokens, T5 tokenizer, 256-token sequences): perplexity, memory in GB as the
# paper estimates it (bf16 weights + optimizer states, not this table's fp32 accounting) and the source tag of
# shared/research/lost_sltrain.md (1.9, 2.5, 3.4).
PUBLISHED_60M = {
    "dense": (34.06, 0.36, "GaLore-paper Table 2 (Full-Rank)"),
    "lowrank": (78.18, 0.26, "GaLore-paper Table 2"),
    "galore": (34.88, 0.24, "GaLore-paper Table 2"),
    "sltrain": (34.15, 0.27, "SLTrain Table 2 [RECALL]; memory: its formula (note 1.9)"),
    "lost": (32.25, None, "LOST Table 3 via [LOST-rev]; memory not published in stored text"),
}


NOTE = (
    "state MiB: fp32 weights + grads + optimizer states (GaLore: projected moments and projector) + index buffers, "
    "measured after training. Published memory: the papers' estimate at 60M (bf16 weights + optimizer states, no "
    "grads), after 1.1B C4 tokens with a 32k T5 vocabulary: for orientation, not comparable number for number."
)


def rank_overrides(method: str, rank: int) -> list:
    """The papers' rank for this width (see the module docstring); dense trains full-rank."""
    return {
        "dense": [],
        "lowrank": [f"method.rank={rank}"],
        "galore": [f"optim.galore_rank={rank}"],
        "sltrain": [f"method.rank={rank}", f"method.alpha={rank / 4:g}"],  # alpha / r = 0.25, as at 60M
        "lost": [f"method.rank={rank}"],
    }[method]


def method_args(args, method: str):
    """methods.py's run arguments for one method: the BPE data, the model's vocabulary and the method's rank."""
    a = copy.copy(args)
    a.extra = [
        "data.tokenizer=hf",
        f"data.tokenizer_path={args.tokenizer_path}",
        f"model.vocab_size={args.vocab}",
        *rank_overrides(method, args.rank),
        # The curve: --curve-points capped evaluations (methods.py's 50-step, 8-batch ones would cost a tenth of
        # the budget here); the table's number is train_one's final full-split evaluation.
        f"train.eval_interval={eval_interval(args.steps or 1, args.curve_points)}",  # steps None: calibrating
        f"train.eval_max_batches={args.curve_batches}",
        *args.extra,
    ]
    return a


def build_tokenizer_for(args) -> None:
    """Train the BPE on the corpus's training documents; sets args.tokenizer_path, args.vocab, args.rank."""
    cfg = compose([f"model={args.model}", f"data={args.corpus}"])
    held_out = set(cfg.data.valid_docs)
    docs = {k: v for k, v in CORPORA[args.corpus].load().items() if k not in held_out}
    args.tokenizer_path = args.workdir / f"bpe_{args.corpus}_{args.vocab_size}.json"
    t0 = time.perf_counter()
    train_bpe(docs.values(), args.vocab_size, args.tokenizer_path)
    args.vocab = len(token_byte_lengths(args.tokenizer_path))
    args.rank = args.rank or cfg.model.dim // 4
    args.train_bytes = sum(len(v.encode("utf-8")) for v in docs.values())
    print(
        f"BPE: {args.vocab} ids trained on {len(docs)} training documents ({args.train_bytes:,} bytes) of "
        f"data={args.corpus} in {time.perf_counter() - t0:.1f} s -> {args.tokenizer_path}; rank {args.rank}",
        flush=True,
    )


def time_method(method: str, args, calib_steps: int) -> dict:
    """Seconds of set-up, of a training step (median of `calib_steps` after a warm-up) and of one evaluation
    batch, and the number of full-split evaluation batches, for one method at the run's shapes."""
    a = method_args(args, method)
    a.steps = calib_steps + 1
    run_dir = args.workdir / f"calib_{method}"
    cfg = quality_config(method, None, a, run_dir, corpus=args.corpus, seed=args.seed)
    with open(f"{run_dir}.log", "w") as log, contextlib.redirect_stdout(log):
        t0 = time.perf_counter()
        trainer = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), run_dir)
        setup = time.perf_counter() - t0
        steps = []
        for _ in range(calib_steps + 1):
            t0 = time.perf_counter()
            trainer.train_step()
            steps.append(time.perf_counter() - t0)
        trainer.cfg.train.eval_max_batches = 2
        t0 = time.perf_counter()
        trainer.evaluate()
        eval_batch = (time.perf_counter() - t0) / 2
        n_eval = math.ceil(len(trainer.data.valid) / trainer.cfg.train.eval_batch_size)
        trainer.close()
    return {
        "setup_s": setup,
        "step_s": statistics.median(steps[1:]),
        "eval_batch_s": eval_batch,
        "eval_batches": n_eval,
    }


def eval_interval(steps: int, points: int) -> int:
    """train.eval_interval for `points` capped evaluations during a run (0: none, only the final ones)."""
    return max(steps // points, 1) if points > 0 else 0


def run_seconds(t: dict, steps: int, points: int, cap: int) -> float:
    """Predicted wall time of one method's run (`train_one`): set-up, steps, the capped evaluations (every
    `eval_interval` steps before the last, and fit's own at the end), and the final full-split evaluation."""
    every = eval_interval(steps, points)
    n_capped = (steps - 1) // every + 1 if every else 1  # + 1: fit's own evaluation after the last step
    evals = n_capped * min(cap, t["eval_batches"]) + t["eval_batches"]
    return t["setup_s"] + steps * t["step_s"] + t["eval_batch_s"] * evals


def calibrate_steps(timings: dict, seconds_left: float, safety: float, points: int, cap: int) -> int:
    """The largest step count whose predicted total (every method, `run_seconds`) fits `safety` x seconds_left
    (0 when not even one step does). The total grows with the steps, so a bisection finds it."""

    def fits(steps: int) -> bool:
        return sum(run_seconds(t, steps, points, cap) for t in timings.values()) <= safety * seconds_left

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def bits_per_byte(val_loss: float, val_tokens: int, val_bytes: int) -> float:
    """Total validation loss (nats) over the bytes the scored tokens stand for, in bits."""
    return val_loss * val_tokens / (math.log(2) * val_bytes)


def scored_bytes(args) -> tuple:
    """(tokens, UTF-8 bytes) that the full-split evaluation scores: every validation sample's labels (the EOD
    counts as a token of 0 bytes), and the held-out documents' raw byte count for reference."""
    from megaeff.data.builder import BuildContext, build_data

    cfg = quality_config("dense", None, method_args(args, "dense"), args.workdir / "bytes", corpus=args.corpus)
    data = build_data(cfg.data, BuildContext(1, cfg.train.seed, True, lambda: None))
    labels = np.concatenate([np.asarray(data.valid.tokens(i)[1:]) for i in range(len(data.valid))])
    lengths = token_byte_lengths(args.tokenizer_path)
    docs = CORPORA[args.corpus].load()
    raw = sum(len(docs[d].encode("utf-8")) for d in cfg.data.valid_docs)
    return int(labels.size), int(lengths[labels].sum()), raw


def table_rows(runs: dict, val_tokens: int, val_bytes: int) -> list:
    """One row per method: the measured columns, ratios to dense, and the published 60M numbers."""
    dense = runs.get("dense")
    rows = []
    for m, r in runs.items():
        ppl, mem, src = PUBLISHED_60M[m]
        rows.append(
            {
                "method": m,
                "val_ppl": r["val_ppl"],
                "bpb": bits_per_byte(r["val_loss"], val_tokens, val_bytes),
                "params": r["params"],
                "state_bytes": r["state_bytes"],
                "ppl_vs_dense": r["val_ppl"] / dense["val_ppl"] if dense else None,
                "state_vs_dense": r["state_bytes"] / dense["state_bytes"] if dense else None,
                "tokens": r["tokens"],
                "published_ppl_60m": ppl,
                "published_mem_gb_60m": mem,
                "source": src,
            }
        )
    return rows


def format_table(rows: list) -> str:
    header = (
        f"{'method':<9}{'val ppl':>9}{'bpb':>7}{'x dense':>9}{'params':>9}{'state MiB':>10}{'x dense':>9}"
        f"{'tokens':>11}   {'published 60M: ppl (mem)':<26}source"
    )
    lines = [header, "-" * (len(header) + 40)]
    for r in rows:
        mem = r["published_mem_gb_60m"]
        pub = f"{r['published_ppl_60m']:.2f} ({'-' if mem is None else f'{mem:.2f}G'})"
        ratio = "" if r["ppl_vs_dense"] is None else f"{r['ppl_vs_dense']:.3f}"
        mem_ratio = "" if r["state_vs_dense"] is None else f"{r['state_vs_dense']:.3f}"
        lines.append(
            f"{r['method']:<9}{r['val_ppl']:>9.2f}{r['bpb']:>7.3f}{ratio:>9}{r['params'] / 1e6:>8.2f}M"
            f"{r['state_bytes'] / 2**20:>10.1f}{mem_ratio:>9}{r['tokens']:>11,}   {pub:<26}{r['source']}"
        )
    return "\n".join(lines)


def summary_line(rows: list) -> str:
    parts = [
        f"{r['method']} ppl x{r['ppl_vs_dense']:.3f} state x{r['state_vs_dense']:.3f}"
        for r in rows
        if r["method"] != "dense" and r["ppl_vs_dense"] is not None
    ]
    return f"summary vs dense ({rows[0]['tokens']:,} tokens each): " + "; ".join(parts)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--corpus", default="default", help="data group (conf/data/): default (Shakespeare) or pydocs")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=None, help="default: model.dim // 4 (the papers' ratio at 60M)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=None, help="fixed steps (overrides --budget-minutes)")
    ap.add_argument("--budget-minutes", type=float, default=50.0)
    ap.add_argument("--calib-steps", type=int, default=3)
    ap.add_argument("--curve-points", type=int, default=0, help="capped evaluations during each run (a PNG if > 0)")
    ap.add_argument("--curve-batches", type=int, default=1, help="batches of each capped evaluation")
    ap.add_argument("--safety", type=float, default=0.9, help="fraction of the time left the runs may plan to use")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("runs/small_scale"))
    ap.add_argument("--out", type=Path, default=Path("small_scale.json"))
    ap.add_argument("--png", type=Path, default=None, help="perplexity against tokens (default: next to --out)")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args(argv)
    args.final_eval_batches = None  # methods.train_one: the whole held-out split
    return args


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    build_tokenizer_for(args)
    timings = {}
    if args.steps is None:
        timings = {m: time_method(m, args, args.calib_steps) for m in args.methods}
        left = args.budget_minutes * 60 - (time.perf_counter() - started)
        args.steps = calibrate_steps(timings, left, args.safety, args.curve_points, args.curve_batches)
        print(
            "calibration (s): "
            + ", ".join(f"{m} step {t['step_s']:.2f} eval batch {t['eval_batch_s']:.2f}" for m, t in timings.items())
            + f"; {left:.0f} s left -> {args.steps} steps",
            flush=True,
        )
        if args.steps < 1:
            raise SystemExit("small_scale: the budget does not fit one step per method; raise --budget-minutes")
    val_tokens, val_bytes, raw_bytes = scored_bytes(args)
    runs = {}
    for m in args.methods:
        run_dir = args.workdir / m
        with open(f"{run_dir}.log", "w") as log, contextlib.redirect_stdout(log):
            r = train_one(m, None, method_args(args, m), run_dir, corpus=args.corpus, seed=args.seed)
        r["tokens"] = args.steps * args.batch * args.seq_len
        r["predicted_s"] = (
            run_seconds(timings[m], args.steps, args.curve_points, args.curve_batches) if timings else None
        )
        runs[m] = r
        print(f"{m:<8} val_ppl {r['val_ppl']:.3f} ({r['train_seconds']:.0f} s training)", flush=True)
    rows = table_rows(runs, val_tokens, val_bytes)
    print(
        f"\n{args.model}, data={args.corpus}, BPE vocab {args.vocab}, rank {args.rank}, {args.steps} steps x "
        f"{args.batch} x {args.seq_len} tokens, seed {args.seed}; validation: {val_tokens:,} tokens scored, "
        f"{val_bytes:,} bytes ({raw_bytes:,} in the held-out documents); {time.perf_counter() - started:.0f} s total"
    )
    print(format_table(rows))
    print(NOTE)
    png = args.png or args.out.with_suffix(".png")
    if args.curve_points > 0:
        plot_curves({args.corpus: {m: [r] for m, r in runs.items()}}, args.batch * args.seq_len, png)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "calibration": timings,
                "validation": {"tokens": val_tokens, "bytes": val_bytes, "held_out_bytes": raw_bytes},
                "rows": rows,
                "runs": runs,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}" + (f" and {png}" if args.curve_points > 0 else ""))
    print(summary_line(rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MegaeffError as exc:  # a missing package or a bad override: one line, as the CLI prints it
        sys.exit(f"small_scale: error: {exc}")
