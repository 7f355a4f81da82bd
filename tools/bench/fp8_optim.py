#!/usr/bin/env python
"""FP8 AdamW (COAT) against FP32 AdamW and torchao's AdamWFp8 / AdamW8bit.

    python tools/bench/fp8_optim.py --error-steps 200 --train-steps 300 --out bench_fp8_optim.json

Three phases:
1. Moments on identical gradients: one FP32 model trains the tiny LLaMA on the default corpus and its gradient of
   every step is handed to each optimizer (each updates its own copy of the weights, so only the quantization of
   the states differs). After every `--every` steps the dequantized moments are compared with the exact FP32
   moments an FP32 AdamW computes from the same gradients: relative L2 error of m and v, and COAT's Table 1
   metric, the MSE of m / sqrt(v) (here relative to the mean square of the exact m / sqrt(v)). Only tensors that
   every optimizer quantizes are compared (torchao keeps FP32 state below 4096 elements or when numel % 256 != 0).
   Also the state bytes per parameter, measured from the state tensors.
2. Training: the trainer runs the tiny model on the default corpus with optim=adamw (FP32), optim=coat_adamw
   (FP8 states only) and precision=coat (FP8 states, activations and GEMMs), and, outside the trainer's optimizer
   builder, with torchao AdamWFp8 and AdamW8bit; final train loss and validation loss at the same steps.
3. CPU step time (ns per parameter) of COAT with fp8_backend=auto (the C++ kernel), the torch reference,
   torchao's AdamWFp8 and FP32 foreach AdamW on the parameters of `--timing-model` (llama_20m, vocab 32000),
   alternating rounds in one process per thread count (`--timing-threads`, default 1 and 2), and how often the
   C++ fast path fell back to libm. The last line is COAT / torchao per thread count. Timing only:

    python tools/bench/fp8_optim.py --phases timing --timing-steps 7 --out bench_fp8_timing.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megaeff.distributed.dims import ParallelDims  # noqa: E402
from megaeff.optim.builder import param_groups  # noqa: E402
from megaeff.optim.coat_adamw import CoatAdamW  # noqa: E402
from megaeff.optim.schedule import LRScheduler  # noqa: E402
from megaeff.precision.group_quant import dequantize  # noqa: E402
from megaeff.train.perf import tensor_bytes  # noqa: E402
from megaeff.train.trainer import Trainer  # noqa: E402
from tools.bench.common import compose  # noqa: E402


def torchao_optimizers() -> Dict[str, Callable]:
    try:
        from torchao.optim import AdamW8bit, AdamWFp8
    except ImportError:
        print("torchao is not installed (pip install torchao): its rows are skipped", flush=True)
        return {}
    return {"torchao AdamWFp8": AdamWFp8, "torchao AdamW8bit": AdamW8bit}


def make_optimizer(kind: str, params, lr: float, betas, wd: float, backend: str = "auto"):
    if kind == "fp32 AdamW":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd, foreach=True)
    if kind.startswith("COAT"):
        expand = "no expansion" not in kind
        second = "e5m2" if "E5M2" in kind else "e4m3"
        return CoatAdamW(
            params, lr=lr, betas=betas, weight_decay=wd, expand=expand, second_moment=second, backend=backend
        )
    return torchao_optimizers()[kind](params, lr=lr, betas=betas, weight_decay=wd)


def moments(opt, p) -> tuple:
    """FP32 (m, v) of a parameter whose moments the optimizer quantizes, dequantized."""
    st = opt.state[p]
    m, v = st["exp_avg"], st["exp_avg_sq"]
    if isinstance(opt, CoatAdamW):
        layout = opt.layout(p)
        return dequantize(m, st["exp_avg_meta"], layout), dequantize(v, st["exp_avg_sq_meta"], layout)
    return m.dequantize().float(), v.dequantize().float()


def is_quantized(opt, p) -> bool:
    m = opt.state[p]["exp_avg"]
    return m.dtype != torch.float32 if isinstance(opt, CoatAdamW) else hasattr(m, "dequantize")


def state_bytes(opt) -> int:
    return tensor_bytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def error_phase(args, kinds) -> Dict:
    cfg = compose(
        [
            "train.resume=none",
            "train.ckpt_interval=0",
            "train.eval_interval=0",
            "train.plot=false",
            f"train.threads={args.threads}",
            f"run_dir={args.workdir / 'error_driver'}",
            "logging.progress=false",
        ]
    )
    with open(args.workdir / "error_driver.log", "w") as log, contextlib.redirect_stdout(log):
        driver = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), args.workdir / "error_driver")
    o = cfg.optim
    betas = tuple(o.betas)
    names = [n for n, _ in driver.model.named_parameters()]
    copies, opts = {}, {}
    for kind in ["fp32 AdamW", *kinds]:
        params = [p.detach().clone().requires_grad_(True) for p in driver.model.parameters()]
        copies[kind] = params
        opts[kind] = make_optimizer(kind, [{"params": params, "weight_decay": 0.0}], o.lr, betas, 0.0, args.backend)
    history = []
    for step in range(1, args.error_steps + 1):
        driver.train_step()  # the driver itself trains with FP32 AdamW; we only take its gradients
        for kind, params in copies.items():
            for p, src in zip(params, driver.model.parameters()):
                p.grad = src.grad.detach().clone()
            opts[kind].step()
        if step % args.every == 0 or step == args.error_steps:
            row = {"step": step}
            exact = opts["fp32 AdamW"]
            common = [i for i in range(len(names)) if all(is_quantized(opts[k], copies[k][i]) for k in kinds)]
            for kind in kinds:
                num_m = num_v = den_m = den_v = num_r = den_r = 0.0
                for i in common:
                    m, v = moments(opts[kind], copies[kind][i])
                    ref = exact.state[copies["fp32 AdamW"][i]]
                    m0, v0 = ref["exp_avg"], ref["exp_avg_sq"]
                    num_m += float(((m - m0) ** 2).sum())
                    den_m += float((m0**2).sum())
                    num_v += float(((v - v0) ** 2).sum())
                    den_v += float((v0**2).sum())
                    mask = (v0 > 0) & (v > 0)
                    r0 = m0[mask] / v0[mask].sqrt()
                    num_r += float(((m[mask] / v[mask].sqrt() - r0) ** 2).sum())
                    den_r += float((r0**2).sum())
                row[kind] = {
                    "m_rel_err": (num_m / den_m) ** 0.5,
                    "v_rel_err": (num_v / den_v) ** 0.5,
                    "m_over_sqrt_v_rel_mse": num_r / den_r,
                }
            history.append(row)
            print(
                f"step {step}: "
                + "; ".join(
                    f"{k} m {row[k]['m_rel_err']:.4f} v {row[k]['v_rel_err']:.4f} "
                    f"m/sqrt(v) {row[k]['m_over_sqrt_v_rel_mse']:.2e}"
                    for k in kinds
                ),
                flush=True,
            )
    n_params = sum(p.numel() for p in driver.model.parameters())
    bytes_per_param = {k: state_bytes(opts[k]) / n_params for k in ["fp32 AdamW", *kinds]}
    driver.close()
    return {"history": history, "bytes_per_param": bytes_per_param, "params": n_params}


def train_phase(args, torchao_kinds) -> Dict:
    runs = {
        "fp32 AdamW": [],
        "COAT FP8 states (optim=coat_adamw)": ["optim=coat_adamw"],
        "COAT full (precision=coat)": ["precision=coat"],
        **{k: [] for k in torchao_kinds},
    }
    out = {}
    for label, overrides in runs.items():
        run_dir = args.workdir / label.split(" (")[0].replace(" ", "_")
        cfg = compose(
            [
                f"train.steps={args.train_steps}",
                "train.resume=none",
                "train.ckpt_interval=0",
                "train.eval_interval=0",
                "train.plot=false",
                f"train.threads={args.threads}",
                f"optim.fp8_backend={args.backend}",
                f"optim.warmup_steps={min(30, max(1, args.train_steps // 10))}",
                f"run_dir={run_dir}",
                "logging.progress=false",
                *overrides,
            ]
        )
        with open(f"{run_dir}.log", "w") as log, contextlib.redirect_stdout(log):
            tr = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), run_dir)
            if label in torchao_kinds:  # the trainer has no builder for torchao: swap it in before step 1
                o = cfg.optim
                tr.optimizer = make_optimizer(label, param_groups(tr.model, o.weight_decay), o.lr, tuple(o.betas), 0.0)
                tr.scheduler = LRScheduler(tr.optimizer, cfg.train.steps, o.warmup_steps, o.min_lr_ratio, o.schedule)
            t0 = time.perf_counter()
            result = tr.fit()
            wall = time.perf_counter() - t0
            tr.close()
        tail = [float(x) for x in result.losses[-20:]]
        out[label] = {
            "final_train_loss_last20": sum(tail) / len(tail),
            "val_loss": float(result.final_eval["val_loss"]),
            "val_ppl": float(result.final_eval["val_ppl"]),
            "seconds": wall,
        }
        print(
            f"{label:<40} train loss (last 20) {out[label]['final_train_loss_last20']:.4f}  "
            f"val loss {out[label]['val_loss']:.4f}  ({wall:.0f} s)",
            flush=True,
        )
    return out


TIMED = (
    ("COAT auto", "COAT", "auto"),
    ("COAT torch reference", "COAT", "torch"),
    ("torchao AdamWFp8", "torchao AdamWFp8", None),
    ("fp32 AdamW (foreach)", "fp32 AdamW", None),
)


def fallback_rate(opt, params) -> Dict[str, float]:
    """One more step of a COAT optimizer through the C++ kernel's counting entry point: how often the fast path's
    interval check left an element to libm on these real states."""
    from megaeff.kernels import fp8_adamw_cpp
    from megaeff.kernels.fp8_adamw import Backend

    totals = dict.fromkeys(fp8_adamw_cpp.STAT_NAMES, 0)

    def counting(entries):
        for name, n in fp8_adamw_cpp.update_with_stats(entries).items():
            totals[name] += n

    opt.backend = Backend("cpp", counting)
    opt.step()
    return {
        **totals,
        "quant_rate": totals["quant_fallback"] / max(totals["quant_checked"], 1),
        "root_rate": totals["root_fallback"] / max(totals["root_checked"], 1),
    }


def timing_one(args) -> Dict:
    """CPU step time of each update on the parameters of `--timing-model`, in alternating rounds (A, B, C, D, A,
    B, ...) so that a change of machine load hits every row alike; medians over the rounds after the first two
    (state allocation, and torchao's compilation). One thread count per process: torchao's compiled kernels fix
    their thread count when they are compiled."""
    from megaeff.models.llama import build_llama

    cfg = compose([f"model={args.timing_model}", f"model.vocab_size={args.timing_vocab}"])
    model = build_llama(cfg.model, cfg.method, device="cpu")
    shapes = [p.shape for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    opts = {}
    for label, kind, backend in TIMED:
        if kind.startswith("torchao") and kind not in torchao_optimizers():
            continue
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        opt = make_optimizer(kind, params, 1e-3, (0.9, 0.95), 0.1, backend or "auto")
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opts[label] = (opt, params)
    times: Dict[str, list] = {label: [] for label in opts}
    cpu: Dict[str, list] = {label: [] for label in opts}
    for i in range(args.timing_steps + 2):
        for label, (opt, _) in opts.items():
            t0, c0 = time.perf_counter(), time.process_time()
            opt.step()
            if i >= 2:
                times[label].append(time.perf_counter() - t0)
                cpu[label].append(time.process_time() - c0)
    rows = {}
    for label, ts in times.items():
        med = statistics.median(ts)
        rows[label] = {"median_s": med, "ns_per_param": med / n * 1e9, "rounds": len(ts)}
        # CPU seconds of the whole process: on a loaded machine, the work itself (spinning OpenMP threads count)
        rows[label]["cpu_ns_per_param"] = statistics.median(cpu[label]) / n * 1e9
    coat = opts["COAT auto"][0]
    out = {"model": args.timing_model, "vocab": args.timing_vocab, "params": n, "threads": torch.get_num_threads()}
    out.update(rows=rows, coat_auto_backend=coat.backend.name, fallbacks=fallback_rate(*opts["COAT auto"]))
    return out


def timing_phase(args) -> Dict:
    """`timing_one` for each of --timing-threads, each in its own process (this script, --timing-child)."""
    import subprocess
    import tempfile

    results = {}
    for threads in args.timing_threads:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "timing.json"
            cmd = [sys.executable, __file__, "--timing-child", "--threads", str(threads), "--out", str(out)]
            cmd += ["--timing-model", args.timing_model, "--timing-vocab", str(args.timing_vocab)]
            cmd += ["--timing-steps", str(args.timing_steps)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            res = json.loads(out.read_text())
        results[str(threads)] = res
        print(
            f"{res['model']} (vocab {res['vocab']}, {res['params'] / 1e6:.1f}M params), {threads} thread(s), "
            f"COAT auto = {res['coat_auto_backend']}:"
        )
        for label, row in res["rows"].items():
            print(
                f"  {label:<24} {row['median_s'] * 1e3:8.1f} ms/step  {row['ns_per_param']:7.2f} ns/param  "
                f"(CPU {row['cpu_ns_per_param']:7.2f} ns/param)"
            )
        fb = res["fallbacks"]
        print(
            f"  fast-path fallbacks: quantize {fb['quant_fallback']} of {fb['quant_checked']} "
            f"({fb['quant_rate']:.1e}), dequantize {fb['root_fallback']} of {fb['root_checked']} "
            f"({fb['root_rate']:.1e})"
        )
    ratios = {}
    for threads, res in results.items():
        rows = res["rows"]
        if "torchao AdamWFp8" in rows:
            ratios[threads] = rows["COAT auto"]["ns_per_param"] / rows["torchao AdamWFp8"]["ns_per_param"]
    return {"by_threads": results, "coat_over_torchao": ratios}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--error-steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--timing-model", default="llama_20m")
    ap.add_argument("--timing-vocab", type=int, default=32000)
    ap.add_argument("--timing-steps", type=int, default=5, help="timed rounds (after two warm-up rounds)")
    ap.add_argument("--timing-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto", help="FP8 AdamW kernel for the COAT rows of phases 1 and 2")
    ap.add_argument("--phases", nargs="+", default=["error", "train", "timing"], choices=["error", "train", "timing"])
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_fp8_optim"))
    ap.add_argument("--out", type=Path, default=Path("bench_fp8_optim.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timing_child:
        args.out.write_text(json.dumps(timing_one(args)))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    tao = list(torchao_optimizers())
    coat_kinds = ["COAT E4M3/E4M3 + expansion", "COAT E4M3/E5M2 + expansion", "COAT E4M3/E4M3 no expansion"]
    result = {"torch": torch.__version__}
    if "error" in args.phases:
        result["error"] = error_phase(args, coat_kinds + tao)
        print(
            "state bytes per parameter (all state tensors / all parameters): "
            + ", ".join(f"{k} {v:.3f}" for k, v in result["error"]["bytes_per_param"].items()),
            flush=True,
        )
    if "train" in args.phases:
        result["train"] = train_phase(args, tao)
    if "timing" in args.phases:
        result["timing"] = timing_phase(args)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    ratios = result.get("timing", {}).get("coat_over_torchao")
    if ratios:  # the ratio is the last line
        print("COAT auto / torchao AdamWFp8 time: " + ", ".join(f"{r:.2f} ({t} thread(s))" for t, r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
