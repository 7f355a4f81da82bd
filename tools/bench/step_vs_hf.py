#!/usr/bin/env python
"""megaeff's training step against Hugging Face's, and LOST / SLTrain against dense, in one process (issue 21,
parts 2 and 3). Every variant trains the same shape on the same random tokens, fp32, with the same threads:

    python tools/bench/step_vs_hf.py --models llama_20m llama_60m --variants hf dense dense_compiled lost sltrain \
        --batch 8 --seq-len 256 --threads 2 --rounds 7 --out bench_step_vs_hf.json

- `hf`: transformers.LlamaForCausalLM (the same config: dim, ffn, heads, layers, vocab, RMSNorm eps, RoPE theta,
  untied head, no biases, sdpa attention) with torch.optim.AdamW (torch's CPU default, foreach) and
  torch.nn.utils.clip_grad_norm_; the loss is the model's own (labels passed in, mean over tokens).
- `dense`, `lost`, `sltrain`: megaeff's own step, exactly what the trainer runs (megaeff/train/step_runner.py
  StepRunner.run on a single-process `parallelize`d model: loss sum over tokens / token count, backward, global
  gradient-norm clip, the optimizer `build_optimizer` picks, LR schedule), with method=<name>_60m (rank 128 etc.).
- `dense_compiled`: `dense` with train.compile=true (torch.compile of each block, inductor).
- `dense_before`: `dense` as it was before issue 21 (a plain nn.Linear head: the trainer then computes the whole
  batch's logits and F.cross_entropy; optim.impl=foreach), to measure this change in the same run.

Each round runs every variant for `--steps` steps in turn (A, B, C, ..., A, B, C, ...), so load from other jobs
spreads over all of them; round 0 is warm-up (and compilation). The median step time over the rest is reported.
The last printed line is the ratio the issue's goal is stated in (dense / hf tokens/s at the last model).
`--profile NAME` instead prints torch.profiler's top ops of NAME's step (after warm-up).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import compose  # noqa: E402

METHOD = {
    "dense": "dense",
    "dense_compiled": "dense",
    "dense_before": "dense",
    "lost": "lost_60m",
    "sltrain": "sltrain_60m",
}


def hf_variant(model_name: str, batch: int, seq_len: int, seed: int = 0):
    """A step function of transformers' LlamaForCausalLM at the megaeff flavor's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = compose([f"model={model_name}"]).model
    hcfg = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.dim,
        intermediate_size=m.ffn_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads or m.n_heads,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="sdpa",
        torch_dtype=torch.float32,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hcfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    tokens = torch.randint(0, m.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step(_: int) -> float:
        # HF shifts labels itself: pass the sequence as both, T tokens -> T-1 predictions (one fewer than megaeff's
        # T; the difference is 1/256 of the loss work).
        out = model(input_ids=inputs, labels=inputs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    del labels
    return step, sum(p.numel() for p in model.parameters())


def megaeff_variant(model_name: str, variant: str, batch: int, seq_len: int, seed: int = 0):
    """A step function of megaeff's trainer step (StepRunner.run) for `variant` (see the module docstring)."""
    from megaeff.distributed.dims import ParallelDims
    from megaeff.distributed.parallelize import parallelize
    from megaeff.layers.attention import select_attention
    from megaeff.models.llama import build_llama, count_params
    from megaeff.optim.builder import build_optimizer
    from megaeff.optim.schedule import LRScheduler
    from megaeff.train.nonfinite import NonFiniteGuard
    from megaeff.train.step_runner import StepRunner

    overrides = [f"model={model_name}", f"method={METHOD[variant]}", "train.steps=100000", f"train.seed={seed}"]
    if variant.endswith("_compiled"):
        overrides.append("train.compile=true")
    if variant == "dense_before":
        overrides.append("optim.impl=foreach")
    cfg = compose(overrides)
    dims = ParallelDims.from_config(cfg.parallel, 1, device=torch.device("cpu"))
    model = build_llama(cfg.model, cfg.method, "meta")
    model.attention_backend = select_attention(cfg.model.attention_backend, torch.device("cpu"))
    parallel = parallelize(model, dims, cfg, device=torch.device("cpu"))
    if variant == "dense_before":  # the step before issue 21: whole-batch logits + F.cross_entropy, foreach AdamW
        plain = torch.nn.Linear(cfg.model.dim, cfg.model.vocab_size, bias=False)
        plain.weight = parallel.module.output.weight
        parallel.module.output = plain
    optimizer, _ = build_optimizer(parallel.module, cfg.optim, dims.device, cfg.precision)
    scheduler = LRScheduler(optimizer, cfg.train.steps, 10, cfg.optim.min_lr_ratio, cfg.optim.schedule)
    guard = NonFiniteGuard("stop", 5)
    runner = StepRunner(cfg, dims, parallel, optimizer, scheduler, None, guard)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    batches = [{"inputs": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}]

    def step(i: int) -> float:
        return runner.run(batches, i)["loss"]

    return step, count_params(parallel.module)


def build(model_name: str, variant: str, batch: int, seq_len: int):
    if variant == "hf":
        return hf_variant(model_name, batch, seq_len)
    return megaeff_variant(model_name, variant, batch, seq_len)


def profile(model_name: str, variant: str, args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, _ = build(model_name, variant, args.batch, args.seq_len)
    for i in range(args.warmup_steps):
        step(i)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            step(100 + i)
    print(
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows, max_name_column_width=60)
    )


def run(model_name: str, args) -> list:
    steps, params, times, cpu, losses, setup_s = {}, {}, {}, {}, {}, {}
    for v in args.variants:
        t0 = time.perf_counter()
        steps[v], params[v] = build(model_name, v, args.batch, args.seq_len)
        setup_s[v] = time.perf_counter() - t0
        times[v], cpu[v], losses[v] = [], [], []
    warm_s = {v: 0.0 for v in args.variants}
    for r in range(args.rounds + 1):  # round 0: warm-up (and compilation)
        for v in args.variants:
            for i in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                losses[v].append(steps[v](r * args.steps + i))
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if r:
                    times[v].append(dt)
                    cpu[v].append(dc)
                else:
                    warm_s[v] += dt
        print(
            f"# {model_name} round {r}: "
            + " ".join(f"{v}={times[v][-1] if r else warm_s[v]:.2f}s" for v in args.variants),
            file=sys.stderr,
            flush=True,
        )
    rows = []
    for v in args.variants:
        med = statistics.median(times[v])
        rows.append(
            {
                "model": model_name,
                "variant": v,
                "params_m": params[v] / 1e6,
                "step_ms": 1e3 * med,
                "step_ms_min": 1e3 * min(times[v]),
                # CPU seconds of this process per step (all threads): less sensitive to other jobs than wall time
                "cpu_ms": 1e3 * statistics.median(cpu[v]),
                "times": times[v],
                "tokens_per_s": args.batch * args.seq_len / med,
                "setup_s": setup_s[v],
                "warmup_s": warm_s[v],
                "first_loss": losses[v][0],
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama_20m", "llama_60m"])
    ap.add_argument("--variants", nargs="+", default=["hf", "dense", "dense_compiled", "lost", "sltrain"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    ap.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    ap.add_argument("--warmup-steps", type=int, default=2, help="(--profile) untimed steps first")
    ap.add_argument("--profile", default=None, help="print the profiler's top ops of this variant's step instead")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("bench_step_vs_hf.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        for name in args.models:
            profile(name, args.profile, args)
        return 0
    rows = []
    print(
        f"{'model':<11}{'variant':<16}{'params':>9}{'ms/step':>10}{'min ms':>9}{'cpu ms':>9}{'tok/s':>9}{'vs hf':>7}"
        f"{'vs dense':>9}{'paired hf':>10}{'paired dense':>13}"
    )
    for name in args.models:
        got = run(name, args)
        by = {r["variant"]: r for r in got}
        for r in got:
            hf = by.get("hf", {}).get("tokens_per_s")
            dense = by.get("dense", {}).get("step_ms")
            r["vs_hf"] = r["tokens_per_s"] / hf if hf else None
            r["step_vs_dense"] = r["step_ms"] / dense if dense else None
            r["cpu_vs_dense"] = r["cpu_ms"] / by["dense"]["cpu_ms"] if dense else None
            r["cpu_vs_hf"] = by["hf"]["cpu_ms"] / r["cpu_ms"] if hf else None
            # Paired within each round (the variants of one round ran back to back): robust to load that changes
            # between rounds.
            nan = float("nan")
            r["paired_vs_dense"] = (
                statistics.median(a / b for a, b in zip(r["times"], by["dense"]["times"])) if dense else nan
            )
            r["paired_vs_hf"] = statistics.median(b / a for a, b in zip(r["times"], by["hf"]["times"])) if hf else nan
            print(
                f"{r['model']:<11}{r['variant']:<16}{r['params_m']:>8.2f}M{r['step_ms']:>10.0f}{r['step_ms_min']:>9.0f}"
                f"{r['cpu_ms']:>9.0f}{r['tokens_per_s']:>9.0f}"
                f"{(r['vs_hf'] or nan):>7.2f}{(r['step_vs_dense'] or nan):>9.2f}"
                f"{r['paired_vs_hf']:>10.2f}{r['paired_vs_dense']:>13.2f}",
                flush=True,
            )
        rows += got
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    last = [r for r in rows if r["model"] == args.models[-1]]
    by = {r["variant"]: r for r in last}
    if "hf" in by and "dense" in by:
        print(f"{args.models[-1]}: megaeff dense / Hugging Face tokens/s = {by['dense']['vs_hf']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
