#!/usr/bin/env python
"""Context parallelism on CPU: bytes per layer, longest trainable sequence under a memory budget, compute balance.

    python tools/bench/context_parallel.py --out bench_cp.json

Shapes are LLaMA-7B's attention (hidden 4096, 32 query heads of 128; 32 or 8 key/value heads), batch 1.
1. Bytes per layer per rank. Real runs: `cp` gloo processes (spawned here) run one attention forward + backward
   of bf16 activations (fp32 accumulation, as on GPU) at the `--real-seqs` lengths and report the
   `dims.comm_stats` counters; the other lengths are dry runs of the same code on meta tensors (shapes only,
   bytes recorded, nothing sent). Both stand next to the closed forms of
   megaeff/distributed/context_parallel/attention.py
   and Megatron TP+SP's (2 all-gathers + 2 reduce-scatters of the N x h activations forward, their conjugates
   plus the re-gather of the inputs for the weight gradients backward: 10 (P-1)/P N h e leave each rank).
   "Sent" = bytes that leave the rank: p2p sends in full, (P-1)/P of an all-to-all or ring collective payload.
2. Longest sequence one attention layer (q/k/v/o projections, RoPE, attention; fp32 weights, gradients and
   activations) trains in under `--budget-gib` per rank. The layer builds RoPE tables of its own tokens' positions
   only (`rope_tables_at`) and, like the model's Attention.forward, keeps no reference to q, k, v once attention
   has run (only what autograd saved stays). Measure: peak *live tensor bytes*, measured by a dispatch mode
   that tracks every storage an op creates until it is freed, on meta tensors (dry runs, so any length is
   cheap); a real gloo run at `--check-seq` checks that the meta peak equals the real one. It excludes the
   allocator's cache, the torch runtime, gloo's buffers and the scratch a fused kernel allocates inside one op
   (torch's CPU flash kernel: per-thread tiles of a few hundred KB). One row per block kernel
   (`--backends`: `math` materializes each block's fp32 scores; `auto` is torch's flash attention for CPU per
   block, which runs on meta tensors through torch's meta kernels) and head grouping (`--head-groups`: 1 = all
   heads at once, auto = context_parallel/heads.py).
3. Compute balance: attention blocks and causally visible score entries per rank (AttentionCounter).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megaeff.distributed.comm import CommGroup, CommStats  # noqa: E402
from megaeff.distributed.context_parallel.attention import AttentionCounter, ContextParallelAttention, comm_bytes  # noqa: E402
from megaeff.layers.rope import apply_rope, rope_tables_at  # noqa: E402

HIDDEN, HEADS, HEAD_DIM = 4096, 32, 128
SCHEMES = [("ring", "zigzag"), ("ring", "contiguous"), ("lightseq", "contiguous"), ("ulysses", "contiguous")]
MB = 1e6


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages alive after each op (views share their storage and count once)."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, tuple] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                entry = self.live.get(st._cdata)
                if entry is None or entry[0].expired():
                    self.live[st._cdata] = (StorageWeakRef(st), st.nbytes())
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


# ----------------------------------------------------------------------------- one rank's work
def attention_step(cg, stats, impl, sharding, T, hkv, device, dtype=torch.bfloat16):
    """One attention forward + backward on random local q, k, v (default block kernel): bytes, counter and
    wall time."""
    counter = AttentionCounter()
    attn = ContextParallelAttention(cg, impl, sharding, counter=counter)
    Tl = T // cg.size
    gen = torch.Generator().manual_seed(cg.rank) if device.type != "meta" else None
    q, k, v = (
        torch.randn(1, h, Tl, HEAD_DIM, generator=gen, device=device).to(dtype).requires_grad_(True)
        for h in (HEADS, hkv, hkv)
    )
    stats.reset()
    t0 = time.perf_counter()
    out = attn(q, k, v)
    fwd = stats.snapshot()
    stats.reset()
    out.backward(torch.ones_like(out))
    return dict(
        fwd=fwd,
        bwd=stats.snapshot(),
        counter=counter.as_dict(),
        wall_s=time.perf_counter() - t0,
        sends_out=attn.sends_out,
    )


def layer_step(cg, impl, sharding, T, hkv, device, backend="auto", groups="auto"):
    """Peak live tensor bytes of training one fp32 attention layer on this rank's shard of T tokens."""
    tracker = LiveTensorBytes()
    with tracker:
        attn = ContextParallelAttention(cg, impl, sharding, backend=backend, head_groups=groups)
        Tl = T // cg.size
        w = [(torch.randn(HIDDEN, h * HEAD_DIM, device=device) * 0.02).requires_grad_(True) for h in (HEADS, hkv, hkv)]
        wo = (torch.randn(HEADS * HEAD_DIM, HIDDEN, device=device) * 0.02).requires_grad_(True)
        x = torch.randn(1, Tl, HIDDEN, device=device).requires_grad_(True)
        # RoPE tables of this rank's positions only (a whole-sequence table on every rank would not shrink with cp)
        cos, sin = rope_tables_at(attn.positions(T, device=device), HEAD_DIM, 10000.0)
        q, k, v = ((x @ wi).view(1, Tl, -1, HEAD_DIM).transpose(1, 2) for wi in w)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attn(q, k, v).transpose(1, 2).reshape(1, Tl, -1) @ wo
        del q, k, v  # as in the model's Attention.forward: only what autograd saved outlives the forward
        y.backward(torch.ones_like(y))
        del y
    return tracker.peak


def dry_cg(cp, rank, stats=None):
    return CommGroup("cp", None, stats, cp, rank)


def dry_attention(impl, sharding, cp, T, hkv):
    """Per-rank results of the meta dry run of `attention_step`."""
    out = []
    for r in range(cp):
        stats = CommStats()
        out.append(attention_step(dry_cg(cp, r, stats), stats, impl, sharding, T, hkv, torch.device("meta")))
    return out


def dry_peak(impl, sharding, cp, T, hkv, backend="auto", groups="auto"):
    meta = torch.device("meta")
    return max(layer_step(dry_cg(cp, r), impl, sharding, T, hkv, meta, backend, groups) for r in range(cp))


# ----------------------------------------------------------------------------- real gloo runs
def _worker(rank, world, port, cases, out_dir):
    import torch.distributed as dist

    from megaeff.distributed.dims import ParallelDims

    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dims = ParallelDims(tp=1, cp=world, dp=1, pp=1, world_size=world, rank=rank)
    dims.build_groups()
    cg, results = dims.comm("cp"), []
    for kind, impl, sharding, T, hkv, *kernel in cases:
        if kind == "bytes":
            results.append(attention_step(cg, dims.comm_stats, impl, sharding, T, hkv, torch.device("cpu")))
        else:
            results.append(layer_step(cg, impl, sharding, T, hkv, torch.device("cpu"), *kernel))
        dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


def real_runs(cp, cases) -> List[List]:
    """results[case][rank]"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(_worker, args=(cp, port, cases, tmp), nprocs=cp, start_method="spawn")
        per_rank = [pickle.load(open(os.path.join(tmp, f"rank{r}.pkl"), "rb")) for r in range(cp)]
    return [[per_rank[r][i] for r in range(cp)] for i in range(len(cases))]


# ----------------------------------------------------------------------------- phases
def sent_bytes(impl, recorded, cp):
    return recorded * (cp - 1) / cp if impl == "ulysses" else recorded


def bytes_phase(args, real):
    rows = []
    for T in args.seqs:
        for hkv in args.kv_heads:
            for cp in args.cps:
                N = T  # batch 1
                rows.append(
                    dict(
                        seq=T,
                        kv_heads=hkv,
                        cp=cp,
                        scheme="Megatron TP+SP (closed form)",
                        source="formula",
                        recorded_mb=10 * N * HIDDEN * 2 / MB,
                        sent_mb=10 * (cp - 1) / cp * N * HIDDEN * 2 / MB,
                        formula_mb=10 * N * HIDDEN * 2 / MB,
                        min_sent_mb=None,
                        match=None,
                    )
                )
                for impl, sharding in SCHEMES:
                    if impl == "ulysses" and (HEADS % cp or hkv % cp):
                        continue
                    if sharding == "contiguous" and impl == "ring":
                        continue  # the same bytes as zigzag; kept for the balance table
                    key = ("bytes", impl, sharding, T, hkv)
                    per_rank = real.get((cp, key)) or dry_attention(impl, sharding, cp, T, hkv)
                    rec = [sum(r["fwd"].values()) + sum(r["bwd"].values()) for r in per_rank]
                    out = per_rank[0]["sends_out"]
                    formula = [
                        sum(
                            comm_bytes(
                                impl, B=1, T=T, cp=cp, Hq=HEADS, Hkv=hkv, D=HEAD_DIM, elem=2, rank=r, sends_out=out
                            )
                        )
                        for r in range(cp)
                    ]
                    rows.append(
                        dict(
                            seq=T,
                            kv_heads=hkv,
                            cp=cp,
                            scheme=f"{impl}/{sharding}",
                            source="real gloo run" if (cp, key) in real else "meta dry run",
                            recorded_mb=max(rec) / MB,
                            formula_mb=max(formula) / MB,
                            sent_mb=sent_bytes(impl, max(rec), cp) / MB,
                            min_sent_mb=sent_bytes(impl, min(rec), cp) / MB,
                            match=rec == formula,
                            per_rank_recorded=rec,
                        )
                    )
    return rows


def longest(impl, sharding, cp, hkv, budget, backend, groups):
    """Longest multiple of 128 cp tokens whose dry-run peak fits `budget` (doubling, then bisection)."""
    unit = 128 * cp
    lo, hi = 0, 1
    while dry_peak(impl, sharding, cp, hi * unit, hkv, backend, groups) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if dry_peak(impl, sharding, cp, mid * unit, hkv, backend, groups) <= budget else (lo, mid)
    return lo * unit


def memory_phase(args, real):
    rows, budget = [], args.budget_gib * 2**30
    for hkv in args.memory_kv_heads:
        for backend in args.backends:
            for groups in args.head_groups:
                for cp in (1, 2, 4):
                    if cp == 1 and groups != args.head_groups[0]:
                        continue  # cp=1: no communication buffers, auto runs one group
                    for impl, sharding in SCHEMES[:1] if cp == 1 else SCHEMES:  # cp=1: every impl is local attention
                        if impl == "ulysses" and (HEADS % cp or hkv % cp):
                            continue
                        g = int(groups) if groups.isdigit() else groups
                        T = longest(impl, sharding, cp, hkv, budget, backend, g)
                        peak = dry_peak(impl, sharding, cp, T, hkv, backend, g) / 2**30 if T else None
                        row = dict(
                            kv_heads=hkv,
                            backend=backend,
                            head_groups=groups if cp > 1 else "-",
                            cp=cp,
                            scheme=f"{impl}/{sharding}" if cp > 1 else "none",
                            max_seq=T,
                            peak_gib_at_max=peak,
                        )
                        check = real.get((cp, ("memory", impl, sharding, args.check_seq, hkv, backend, g)))
                        if check is not None:
                            row["check_seq"] = args.check_seq
                            row["check_real_gib"] = max(check) / 2**30
                            meta = dry_peak(impl, sharding, cp, args.check_seq, hkv, backend, g)
                            row["check_meta_gib"] = meta / 2**30
                        rows.append(row)
                        print(f"  memory: {row}", flush=True)
    return rows


def balance_phase(args, real):
    rows = []
    for cp in args.balance_cps:
        for impl, sharding in SCHEMES:
            if impl == "ulysses" and HEADS % cp:
                continue
            key = ("bytes", impl, sharding, args.seqs[0], args.kv_heads[0])
            per_rank = real.get((cp, key)) or dry_attention(impl, sharding, cp, args.seqs[0], args.kv_heads[0])
            blocks = [r["counter"]["forward_blocks"] for r in per_rank]
            work = [r["counter"]["forward_work"] for r in per_rank]
            rows.append(
                dict(
                    cp=cp,
                    scheme=f"{impl}/{sharding}",
                    blocks=blocks,
                    work_max_over_min=max(work) / min(work),
                    work_max_over_mean=max(work) / (sum(work) / len(work)),
                    wall_s=[round(r["wall_s"], 2) for r in per_rank] if (cp, key) in real else None,
                )
            )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--real-seqs", type=int, nargs="*", default=[4096], help="lengths run for real on gloo")
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--cps", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--balance-cps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--budget-gib", type=float, default=8.0)
    ap.add_argument("--check-seq", type=int, default=1024, help="length of the real-run check of the meta peak")
    ap.add_argument("--backends", nargs="+", default=["math", "auto"], help="block kernels of the memory search")
    ap.add_argument("--head-groups", nargs="+", default=["1", "auto"], help="head groups of the memory search")
    ap.add_argument("--memory-kv-heads", type=int, nargs="+", default=[32], help="kv heads of the memory search")
    ap.add_argument("--out", default="bench_cp.json")
    args = ap.parse_args(argv)

    t0 = time.time()
    real: Dict[tuple, list] = {}
    for cp in args.cps:
        cases = [
            ("bytes", impl, sharding, T, hkv)
            for T in args.real_seqs
            for hkv in args.kv_heads
            for impl, sharding in SCHEMES
            if not (impl == "ulysses" and (HEADS % cp or hkv % cp))
        ]
        cases += [
            ("memory", impl, sharding, args.check_seq, args.memory_kv_heads[0], backend, "auto")
            for impl, sharding in SCHEMES
            for backend in args.backends
        ]
        print(f"real gloo runs, cp={cp}: {len(cases)} cases", flush=True)
        for case, per_rank in zip(cases, real_runs(cp, cases)):
            real[(cp, case)] = per_rank
    print(f"  ({time.time() - t0:.0f} s)", flush=True)

    result = dict(
        shapes=dict(hidden=HIDDEN, heads=HEADS, head_dim=HEAD_DIM, batch=1, activations="bf16", accumulation="fp32"),
        budget_gib=args.budget_gib,
        bytes=bytes_phase(args, real),
        memory=memory_phase(args, real),
        balance=balance_phase(args, real),
    )
    result["seconds"] = round(time.time() - t0, 1)

    print("\nBytes per layer per rank (attention fwd + bwd; TP+SP: the whole layer), MB; LightSeq: max over ranks")
    print(
        "| seq | kv heads | cp | scheme | source | recorded | closed form | sent by rank (max / min) "
        "| counter = formula |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["bytes"]:
        low = "" if r["min_sent_mb"] is None or r["min_sent_mb"] == r["sent_mb"] else f" / {r['min_sent_mb']:.1f}"
        match = "-" if r["match"] is None else ("yes" if r["match"] else "NO")
        print(
            f"| {r['seq']} | {r['kv_heads']} | {r['cp']} | {r['scheme']} | {r['source']} | {r['recorded_mb']:.1f} | "
            f"{r['formula_mb']:.1f} | {r['sent_mb']:.1f}{low} | {match} |"
        )
    print(f"\nLongest trainable sequence, one fp32 attention layer, {args.budget_gib:g} GiB of live tensors per rank")
    print(
        "| kv heads | block kernel | head groups | cp | scheme | max seq | x cp=1 | peak GiB at max "
        "| real / meta peak at check seq (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = {(r["kv_heads"], r["backend"]): r["max_seq"] for r in result["memory"] if r["cp"] == 1}
    for r in result["memory"]:
        chk = f"{r['check_real_gib']:.3f} / {r['check_meta_gib']:.3f} @ {r['check_seq']}" if "check_seq" in r else "-"
        peak = f"{r['peak_gib_at_max']:.2f}" if r["peak_gib_at_max"] else "-"
        r["x_cp1"] = r["max_seq"] / base[(r["kv_heads"], r["backend"])]
        print(
            f"| {r['kv_heads']} | {r['backend']} | {r['head_groups']} | {r['cp']} | {r['scheme']} | {r['max_seq']} | "
            f"{r['x_cp1']:.2f} | {peak} | {chk} |"
        )
    print(f"\nAttention compute balance at seq {args.seqs[0]} (forward; backward identical)")
    print("| cp | scheme | blocks per rank | visible work max/min | max/mean |")
    print("|---|---|---|---|---|")
    for r in result["balance"]:
        print(
            f"| {r['cp']} | {r['scheme']} | {r['blocks']} | {r['work_max_over_min']:.2f} | "
            f"{r['work_max_over_mean']:.2f} |"
        )
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out} ({result['seconds']} s)")
    best = [r for r in result["memory"] if r["cp"] == 4 and r["backend"] == args.backends[-1]]
    best = [r for r in best if r["head_groups"] == args.head_groups[-1]]
    cp1 = {(r["backend"]): r["max_seq"] for r in result["memory"] if r["cp"] == 1}
    if best and len(cp1) == len(args.backends):
        ratios = ", ".join(f"{r['scheme']} {r['x_cp1']:.2f}x" for r in best)
        new, old = args.backends[-1], args.backends[0]
        print(
            f"longest seq, {new} blocks: cp=1 {cp1[new]} = {cp1[new] / cp1[old]:.2f}x {old}'s; "
            f"cp=4 / cp=1 ({args.head_groups[-1]} head groups): {ratios}"
        )


if __name__ == "__main__":
    main()
