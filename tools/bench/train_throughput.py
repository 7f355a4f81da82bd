#!/usr/bin/env python
"""Training-step throughput of the LLaMA model: tokens/s, time per step and MFU for model flavors x precisions x
attention backends, on whatever device this process has. Prints a table and writes JSON.

    python tools/bench/train_throughput.py --models tiny llama_9m llama_20m --precisions fp32 bf16 \
        --attention sdpa math --batch 8 --seq-len 256 --steps 10 --out bench_throughput.json

Each configuration runs `--warmup` untimed steps, then `--steps` timed ones (forward, backward, AdamW step) on
random tokens; the median step time is reported. FLOPs/token come from the model config
(megaeff.models.llama.flops_per_token), the peak from megaeff.train.perf.peak_flops (an estimate on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megaeff.config.schema import MethodConfig, ModelConfig  # noqa: E402
from megaeff.layers.attention import select_attention  # noqa: E402
from megaeff.models.init import materialize  # noqa: E402
from megaeff.models.llama import build_llama, count_params, flops_per_token  # noqa: E402
from megaeff.train.perf import peak_flops, peak_memory_bytes  # noqa: E402


def load_flavor(name: str) -> ModelConfig:
    from omegaconf import OmegaConf

    path = REPO / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"unknown model flavor {name!r}: no {path}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def bench_one(
    mcfg: ModelConfig, precision: str, attention: str, batch: int, seq_len: int, steps: int, warmup: int, device
):
    torch.manual_seed(0)
    model = materialize(build_llama(mcfg, MethodConfig(), "meta"), device, seed=0, std=mcfg.init_std)
    model.attention_backend = select_attention(attention, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, mcfg.vocab_size, (batch, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    n_params = count_params(model)
    tps = batch * seq_len / step
    fpt = flops_per_token(model, seq_len, batch * seq_len)
    return {
        "model": mcfg.name,
        "params_m": n_params / 1e6,
        "precision": precision,
        "attention": attention,
        "batch": batch,
        "seq_len": seq_len,
        "step_ms": 1e3 * step,
        "step_ms_min": 1e3 * min(times),
        "tokens_per_s": tps,
        "tflops": fpt * tps / 1e12,
        "mfu": fpt * tps / peak_flops(device),
        "peak_mem_mb": peak_memory_bytes(device) / 2**20,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "llama_9m"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--attention", nargs="+", default=["sdpa", "math"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench_throughput.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    header = f"{'model':<11}{'params':>9}{'prec':>6}{'attn':>6}{'ms/step':>10}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>8}"
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for name in args.models:
        mcfg = load_flavor(name)
        for precision in args.precisions:
            for attention in args.attention:
                r = bench_one(mcfg, precision, attention, args.batch, args.seq_len, args.steps, args.warmup, device)
                rows.append(r)
                print(
                    f"{r['model']:<11}{r['params_m']:>8.2f}M{r['precision']:>6}{r['attention']:>6}{r['step_ms']:>10.1f}"
                    f"{r['tokens_per_s']:>10.0f}{r['tflops']:>9.3f}{100 * r['mfu']:>7.2f}%",
                    flush=True,
                )
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_flops_assumed": peak_flops(device),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
