#!/usr/bin/env python
"""Straggler effect and bytes per step: expert FSSDP vs expert parallelism with a fixed placement.

    python tools/bench/moe_straggler.py --dp 4 --steps 6 --out bench_moe_straggler.json

Spawns `--dp` gloo ranks on this machine. Each runs one MoE layer (E experts, top-k, float32, dense experts)
under each router and each layout for `--steps` forward+backward steps with fresh tokens and fresh routing per
step. Routers: `uniform` (random logits) and `skew=s` (a fraction s of the tokens has the hot expert 0 among its
top k, the others never do). Layouts: fixed EP (expert e on rank e mod dp) and FSSDP with `--slots` experts
hosted per rank (EP's share ceil(E/dp) = no spare slot: placement can only rearrange; one more: the default).

Per cell, the mean over steps of:
- straggler = max over ranks of the token rows its experts process / mean (1 = balanced; a step lasts as long
  as its busiest rank when expert compute dominates);
- bytes per rank per step as recorded by comm.py (payload convention, own block included) by kind;
- bytes that actually leave their rank per step (from the dispatch tables: 4 token exchanges, FSSDP's sparse
  all-gather twice with re-materialization and the sparse reduce-scatter once), averaged over ranks;
- wall time of a step on rank 0, for orientation only: on a small shared CPU the ranks compete for cores.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import init_gloo_rank, run_gloo_ranks  # noqa: E402

HOT = 0


def routing_logits(step: int, n: int, experts: int, skew):
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    logits = torch.randn(n, experts, generator=g)
    if skew is not None:
        logits[:, HOT] = -10.0
        logits[torch.randperm(n, generator=g)[: round(skew * n)], HOT] = 10.0
    return logits


def layouts(args):
    return [("ep", {})] + [(f"fssdp slots={s}", dict(slots_per_rank=s)) for s in args.slots]


def routers(args):
    return [("uniform", None)] + [(f"skew={s:g}", s) for s in args.skews]


def _worker(rank: int, args, port: int, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from megaeff.config.schema import MethodConfig, ModelConfig
    from megaeff.distributed.expert_parallel.experts import ExpertFSSDP, ExpertParallel
    from megaeff.models.init import init_weights
    from megaeff.models.moe import MoE

    dims = init_gloo_rank(rank, args.dp, port, timeout_s=300)
    cfg = ModelConfig(dim=args.dim, n_heads=1, moe_experts=args.experts, moe_top_k=args.top_k, moe_ffn_dim=args.hidden)
    n_local = args.tokens
    out = []
    for router, skew in routers(args):
        for name, options in layouts(args):
            moe = MoE(cfg, MethodConfig(), "layers.0.mlp")
            init_weights(moe, 0, 0.02)
            layer = ExpertParallel(moe, dims) if name == "ep" else ExpertFSSDP(moe, dims, **options)
            cells = []
            for step in range(args.steps + 1):  # step 0 warms up
                table = routing_logits(step, n_local * args.dp, args.experts, skew)[
                    rank * n_local : (rank + 1) * n_local
                ]
                layer.router_override = lambda f, t=table: t
                g = torch.Generator().manual_seed(10 * step + rank)
                x = torch.randn(1, n_local, args.dim, generator=g, requires_grad=True)
                dims.comm_stats.reset()
                layer.zero_grad(set_to_none=True)
                dist.barrier()
                t0 = time.perf_counter()
                (layer(x) * 1e-3).sum().backward()
                seconds = time.perf_counter() - t0
                if step == 0:
                    continue
                st = layer.last_stats
                param_passes = 0 if name == "ep" else (3 if layer.rematerialize else 2)
                cells.append(
                    dict(
                        straggler=st.straggler,
                        rows_per_rank=st.rows_per_rank,
                        replicas=[len(h) for h in st.hosts],
                        recorded=dims.comm_stats.snapshot(),
                        # Summed over ranks by the tables, averaged here: identical on every rank.
                        off_rank_token_bytes=4 * st.token_rows_off_rank * args.dim * 4 / args.dp,
                        off_rank_param_bytes=param_passes * st.param_elems_off_rank * 4 / args.dp,
                        seconds=seconds,
                    )
                )
            out.append(dict(router=router, layout=name, steps=cells))
    results.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def summarize(per_rank, args):
    rows = []
    for i, cell in enumerate(per_rank[0]):
        steps = cell["steps"]
        kinds = sorted({k for r in per_rank for s in r[i]["steps"] for k in s["recorded"]})
        recorded = {
            k.split("/", 1)[1]: statistics.mean(s["recorded"].get(k, 0) for r in per_rank for s in r[i]["steps"])
            for k in kinds
        }
        rows.append(
            dict(
                router=cell["router"],
                layout=cell["layout"],
                straggler=statistics.mean(s["straggler"] for s in steps),
                straggler_max=max(s["straggler"] for s in steps),
                hot_replicas=statistics.mean(s["replicas"][HOT] for s in steps),
                recorded_bytes_per_rank=recorded,
                off_rank_token_bytes=statistics.mean(s["off_rank_token_bytes"] for s in steps),
                off_rank_param_bytes=statistics.mean(s["off_rank_param_bytes"] for s in steps),
                step_seconds_rank0=statistics.median(s["seconds"] for s in steps),
            )
        )
    return rows


def print_table(rows):
    mb = 1e6
    head = (
        f"{'router':<9} {'layout':<15} {'straggler':>9} {'worst':>6} {'hot r':>5} {'tok rec MB':>10} "
        f"{'exp rec MB':>10} {'tok off MB':>10} {'exp off MB':>10} {'step s':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        rec = r["recorded_bytes_per_rank"]
        expert = rec.get("sparse_all_gather", 0) + rec.get("sparse_reduce_scatter", 0)
        print(
            f"{r['router']:<9} {r['layout']:<15} {r['straggler']:>9.3f} {r['straggler_max']:>6.2f} "
            f"{r['hot_replicas']:>5.1f} {rec.get('all_to_all', 0) / mb:>10.2f} {expert / mb:>10.2f} "
            f"{r['off_rank_token_bytes'] / mb:>10.2f} {r['off_rank_param_bytes'] / mb:>10.2f} "
            f"{r['step_seconds_rank0']:>7.3f}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skews", type=float, nargs="*", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument(
        "--slots", type=int, nargs="*", default=None, help="FSSDP experts per rank (default: EP's share and one more)"
    )
    ap.add_argument("--out", type=Path, default=Path("bench_moe_straggler.json"))
    args = ap.parse_args(argv)
    share = -(-args.experts // args.dp)
    args.slots = args.slots or sorted({share, min(args.experts, share + 1)})

    per_rank = run_gloo_ranks(_worker, args, args.dp)
    rows = summarize(per_rank, args)
    print(
        f"dp={args.dp}, {args.experts} experts, top-{args.top_k}, dim {args.dim}, hidden {args.hidden}, "
        f"{args.tokens} tokens/rank/step, fp32, {args.steps} steps (MB = 1e6 bytes per rank per step)"
    )
    print_table(rows)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps(dict(config=config, rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
