#!/usr/bin/env python
"""Validate the planner's per-rank numbers: the fake-tensor dry run against the real multi-rank gloo step.

    python tools/bench/planner_validate.py --out bench_planner_validate.json
    python tools/bench/planner_validate.py --layouts tp2_dp2_sp cp2_dp2_fssdp --models tiny

The layout planner (megaeff/train/planner/) sizes every rank of a layout with `measure_step(cfg, rank)`
(megaeff/train/memory/fake_step.py): one training step of that rank on fake tensors in torch's fake process
group, giving its peak live bytes (`.peak_bytes`) and the payload bytes of every collective of the step per
"<axis>/<kind>" (`.extra["comm_bytes"]`, the counters of megaeff/distributed/comm.py). Here every rank of each
layout (4 and 8 ranks) also runs the same step for real: `world` spawned gloo processes on this machine, real
CPU tensors, `measure_real_step` (megaeff/train/memory/real_step.py: the same `build_rank`, `make_batches`
and `StepRunner.run`, under the same StepMemoryTracker, counters reset just before the step).

Both sides count live tensor storages after every op (no allocator rounding on the CPU) and see the same
token ids (`make_batches`, seed 0, on every rank: what the fake measurement of each rank assumes), so the peaks
should agree to the byte and the comm bytes exactly; the table prints the difference. A real gloo rank also
holds gloo's own reduce-scatter buffers (RealStepTracker in real_step.py), which NCCL and the fake world do
not: the table gives the real peak with and without them. `--distinct-tokens` adds a second real run where
each data-parallel replica draws its own tokens (seed = dp x cp coordinate), as training does, against the fake
rank given the same seed: what remains is the one assumption of the fake world, that every rank holds this
rank's tokens (FSSDP's sparse embedding exchange sizes by the other ranks' distinct token ids).

Prints the table (layout, shape, rank, fake peak, real peak, diff %, comm keys and bytes equal) and writes
JSON with `--out`; the last line is the worst difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megaeff.config import compose  # noqa: E402
from megaeff.train.memory.fake_step import layout_world_size, measure_step  # noqa: E402

# name -> overrides. Every degree is explicit (dp=-1 would fill the world). Together: tp with and without
# sequence parallelism, pp with each schedule, cp with each implementation, dp all-reduce and FSSDP (each
# gather dtype), and their combinations, on 4 and 8 ranks.
PP4 = ["train.grad_accum=4"]
LAYOUTS = {
    # 4 ranks
    "tp2_dp2": ["parallel.tp=2", "parallel.dp=2"],
    "tp2_dp2_sp": ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true"],
    "pp2_dp2_1f1b": ["parallel.pp=2", "parallel.dp=2", "parallel.pp_schedule=1f1b", *PP4],
    "pp2_dp2_interleaved": [
        "parallel.pp=2",
        "parallel.dp=2",
        "parallel.pp_schedule=interleaved",
        "parallel.pp_virtual=2",
        *PP4,
    ],
    "cp2_dp2_ring": ["parallel.cp=2", "parallel.dp=2", "parallel.cp_impl=ring"],
    "cp2_dp2_fssdp": ["parallel.cp=2", "parallel.dp=2", "parallel.cp_impl=ring", "parallel.dp_impl=fssdp"],
    "cp2_dp2_ulysses": ["parallel.cp=2", "parallel.dp=2", "parallel.cp_impl=ulysses"],
    "tp2_cp2_lightseq": [
        "parallel.tp=2",
        "parallel.cp=2",
        "parallel.cp_impl=lightseq",
        "parallel.cp_sharding=contiguous",
    ],
    "dp4_fssdp_bf16": ["parallel.dp=4", "parallel.dp_impl=fssdp", "parallel.fssdp_gather_dtype=bf16"],
    # 8 ranks
    "tp2_pp2_dp2_sp": [
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.dp=2",
        "parallel.sequence_parallel=true",
        "parallel.pp_schedule=1f1b",
        *PP4,
    ],
    "tp2_cp2_dp2": ["parallel.tp=2", "parallel.cp=2", "parallel.dp=2"],
    "pp2_dp4_gpipe": ["parallel.pp=2", "parallel.dp=4", "parallel.pp_schedule=gpipe", *PP4],
    "cp2_dp4_fssdp_fp8": [
        "parallel.cp=2",
        "parallel.dp=4",
        "parallel.dp_impl=fssdp",
        "parallel.fssdp_gather_dtype=fp8",
    ],
    "dp8": ["parallel.dp=8"],
}
MODELS = ("tiny", "llama_9m", "llama_20m", "llama_60m")
# model -> layouts (None: all). The larger shapes on the layouts whose ranks hold a share of the model (8 ranks of
# a replicated llama_60m would need ~10 GB on this machine).
DEFAULT_MATRIX = {
    "tiny": None,
    "llama_9m": ["tp2_dp2", "pp2_dp2_1f1b", "cp2_dp2_ring", "dp4_fssdp_bf16"],
    "llama_20m": ["tp2_dp2_sp", "pp2_dp2_interleaved", "cp2_dp2_fssdp", "tp2_cp2_lightseq", "tp2_cp2_dp2"],
    "llama_60m": ["tp2_dp2_sp", "cp2_dp2_fssdp", "tp2_pp2_dp2_sp", "cp2_dp4_fssdp_fp8", "pp2_dp4_gpipe"],
}


# ---------------------------------------------------------------------------------------------------- real ranks
def _summary(report) -> dict:
    return {
        "peak_bytes": report.peak_bytes,
        "comm_bytes": dict(report.extra["comm_bytes"]),
        "phase": report.phase,
        "breakdown": dict(report.breakdown),
        "largest": list(report.largest),
        "unseen_peak_bytes": report.extra["unseen_peak_bytes"],
        "peak_without_unseen": report.extra["peak_without_unseen"],
        "ops": report.ops,
        "loss": report.extra.get("loss"),
    }


def _rank_worker(rank: int, world: int, port: int, tasks, results) -> None:
    """One gloo rank: runs the real step of every config it is sent (None stops it)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from megaeff.train.memory.fake_step import make_dims
    from megaeff.train.memory.real_step import measure_real_step

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=1800))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=1800))
    dims_by_layout = {}  # process groups are collective to make: once per layout
    while (task := tasks.get()) is not None:
        cfg, distinct = task
        try:
            key = tuple(int(getattr(cfg.parallel, a)) for a in ("tp", "cp", "dp", "pp"))
            dims = dims_by_layout.get(key) or dims_by_layout.setdefault(key, make_dims(cfg, rank))
            seed = dims.rank_in("dp_cp") if distinct else 0
            results.put((rank, True, {**_summary(measure_real_step(cfg, dims, seed=seed)), "seed": seed}))
        except Exception:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class GlooRanks:
    """`world` persistent gloo processes (spawned once, reused for every case of that world size)."""

    def __init__(self, world: int):
        import multiprocessing as mp
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.world, self.results = world, ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.procs = [
            ctx.Process(target=_rank_worker, args=(r, world, port, self.tasks[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def submit(self, cfg, distinct: bool = False) -> None:
        for q in self.tasks:
            q.put((cfg, distinct))

    def collect(self, timeout_s: float = 3600.0) -> list:
        out = [None] * self.world
        for _ in range(self.world):
            rank, ok, payload = self.results.get(timeout=timeout_s)
            if not ok:
                raise RuntimeError(f"real rank {rank} failed:\n{payload}")
            out[rank] = payload
        return out

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=60)


# ---------------------------------------------------------------------------------------------------- cases
def case_config(layout: str, model: str, common):
    return compose([f"model={model}", *LAYOUTS[layout], *common])


def run_case(pool: GlooRanks, layout: str, model: str, common, distinct: bool) -> list:
    """Every rank of one layout: the real step on the gloo ranks while this process runs the fake ones."""
    cfg = case_config(layout, model, common)
    pool.submit(cfg)
    t0 = time.perf_counter()
    fake = [measure_step(cfg, rank) for rank in range(pool.world)]
    t_fake = time.perf_counter() - t0
    real = pool.collect()
    t_all = time.perf_counter() - t0
    other = own = None
    if distinct:  # the fake rank given the real rank's own tokens: what remains is the other ranks' tokens
        pool.submit(cfg, distinct=True)
        other = pool.collect()
        own = [measure_step(cfg, rank, seed=o["seed"]) for rank, o in enumerate(other)]
    rows = []
    for rank, (f, r) in enumerate(zip(fake, real)):
        row = {
            "layout": layout,
            "model": model,
            "rank": rank,
            "overrides": [f"model={model}", *LAYOUTS[layout], *common],
            "fake_peak": f.peak_bytes,
            "real_peak": r["peak_bytes"],
            "diff_bytes": f.peak_bytes - r["peak_bytes"],
            "diff_pct": 100.0 * (f.peak_bytes - r["peak_bytes"]) / r["peak_bytes"],
            "comm_equal": f.extra["comm_bytes"] == r["comm_bytes"],
            "gloo_buffer_peak": r["unseen_peak_bytes"],
            "real_peak_without_gloo": r["peak_without_unseen"],
            "diff_without_gloo_bytes": f.peak_bytes - r["peak_without_unseen"],
            "fake_comm": f.extra["comm_bytes"],
            "real_comm": r["comm_bytes"],
            "fake_phase": f.phase,
            "real_phase": r["phase"],
            "fake_breakdown": f.breakdown,
            "real_breakdown": r["breakdown"],
            "fake_largest": f.largest,
            "real_largest": r["largest"],
            "fake_ops": f.ops,
            "real_ops": r["ops"],
            "fake_s_per_rank": t_fake / pool.world,
            "case_s": t_all,
        }
        if other is not None:
            o, g = other[rank], own[rank]
            row.update(
                distinct_seed=o["seed"],
                distinct_fake_peak=g.peak_bytes,
                distinct_real_peak=o["peak_bytes"],
                distinct_real_without_gloo=o["peak_without_unseen"],
                distinct_diff_without_gloo_bytes=g.peak_bytes - o["peak_without_unseen"],
                distinct_fake_comm=g.extra["comm_bytes"],
                distinct_real_comm=o["comm_bytes"],
                distinct_comm_equal=g.extra["comm_bytes"] == o["comm_bytes"],
            )
        rows.append(row)
    return rows


def comm_note(row) -> str:
    """yes, or the keys whose bytes differ with the largest relative difference."""
    if row["comm_equal"]:
        return "yes"
    f, r = row["fake_comm"], row["real_comm"]
    keys = sorted(k for k in set(f) | set(r) if f.get(k) != r.get(k))
    return "no: " + ", ".join(f"{k} {f.get(k, 0):+,} vs {r.get(k, 0):,}".replace("+", "") for k in keys)


def table(rows, distinct: bool) -> str:
    head = (
        "| layout | shape | rank | fake peak (B) | real peak (B) | diff (B) | diff % | gloo buffers (B) "
        "| real peak without them (B) | diff (B) | comm bytes equal |"
    )
    sep = "|---|---|---|---|---|---|---|---|---|---|---|"
    if distinct:
        head += " own tokens: seed | fake peak (B) | real without gloo's (B) | diff (B) | comm equal |"
        sep += "---|---|---|---|---|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['layout']} | {r['model']} | {r['rank']} | {r['fake_peak']:,} | {r['real_peak']:,} | "
            f"{r['diff_bytes']:+,} | {r['diff_pct']:+.4f} | {r['gloo_buffer_peak']:,} | "
            f"{r['real_peak_without_gloo']:,} | {r['diff_without_gloo_bytes']:+,} | {comm_note(r)} |"
        )
        if distinct:
            line += (
                f" {r['distinct_seed']} | {r['distinct_fake_peak']:,} | {r['distinct_real_without_gloo']:,} | "
                f"{r['distinct_diff_without_gloo_bytes']:+,} | {'yes' if r['distinct_comm_equal'] else 'no'} |"
            )
        lines.append(line)
    return "\n".join(lines)


def cases(layouts, models):
    """(layout, model) pairs: the given product, or the default matrix."""
    if layouts or models:
        return [(lay, m) for lay in layouts or list(LAYOUTS) for m in models or list(MODELS)]
    return [(lay, m) for m, lays in DEFAULT_MATRIX.items() for lay in lays or list(LAYOUTS)]


def summary_line(rows) -> str:
    worst = max(rows, key=lambda r: abs(r["diff_pct"]))
    exact = sum(r["diff_without_gloo_bytes"] == 0 for r in rows)
    unequal = [r for r in rows if not r["comm_equal"]]
    other = {
        k
        for r in unequal
        for k in set(r["fake_comm"]) | set(r["real_comm"])
        if r["fake_comm"].get(k) != r["real_comm"].get(k)
    }
    return (
        f"{len(rows)} rank-steps; comm bytes equal in {len(rows) - len(unequal)} (else only {sorted(other)}); "
        f"peak without gloo's buffers equal to the byte in {exact}; worst |fake - real| / real: "
        f"{abs(worst['diff_pct']):.4f}% ({worst['diff_bytes']:+,} B, {worst['layout']} {worst['model']} "
        f"rank {worst['rank']})"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=None, choices=list(LAYOUTS), help="default: the matrix")
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS), help="default: the matrix")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every case")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--distinct-tokens", action="store_true", help="also run real ranks with per-replica tokens")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    common = [f"train.micro_batch_size={args.micro_batch}", f"data.seq_len={args.seq_len}", *args.set]
    by_world = {}
    for layout, model in cases(args.layouts, args.models):
        world = layout_world_size(compose([*LAYOUTS[layout], *common]))
        by_world.setdefault(world, []).append((layout, model))
    rows = []
    for world, todo in sorted(by_world.items()):
        pool = GlooRanks(world)
        try:
            for layout, model in todo:
                case = run_case(pool, layout, model, common, args.distinct_tokens)
                rows += case
                print(f"{layout} {model}: {world} ranks, {case[0]['case_s']:.0f} s; {summary_line(case)}", flush=True)
        finally:
            pool.close()
    print(table(rows, args.distinct_tokens))
    if args.out:
        Path(args.out).write_text(json.dumps({"common": common, "rows": rows}, indent=2))
    print(summary_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
