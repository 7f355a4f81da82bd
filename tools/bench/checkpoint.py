#!/usr/bin/env python
"""Checkpoint save and load: format 1 (everything gathered, written by rank 0) against format 2 (DCP, every rank
writes its own shards), synchronous and asynchronous, on gloo CPU ranks (results: docs/benchmarks.md).

    OMP_NUM_THREADS=1 python tools/bench/checkpoint.py --model llama_130m --world 4 --rounds 3 \\
        --out bench_checkpoint.json

Model: conf/model/<--model>.yaml, method=dense, float32, AdamW (fp32 moments), after one real training step (so
the optimizer state exists), built by megaeff's Trainer. Layouts: FSSDP over dp=world (`parallel.dp_impl=fssdp`:
parameters and optimizer state sharded), and tp2 x dp=world/2 (tensor-parallel halves, replicated over dp).

Each (layout, format) runs in its own pool of `--world` fresh processes, so one format's peak memory or heap can
never hide the other's; the order of the two pools alternates from one layout to the next (format 1 first, then
format 2 first). A pool runs `--rounds` rounds; times are the median over rounds of the slowest rank, memory the
largest over rounds, per rank:

- format 1: `save_v1` (every tensor gathered into the single-process form, then written by rank 0 as model.pt and
  optimizer.pt; the gather is megaeff's all-gather, so every rank holds the whole state for a moment, not only
  rank 0), then a load of it (`load_checkpoint`: every rank reads the whole files and keeps its part);
- format 2: a synchronous save (`Checkpointer(async_save=False)`), a load of it (each rank reads the bytes
  overlapping its boxes), then an asynchronous save (`Checkpointer(async_save=True)`).

Timings: `save` from the barrier before the call to its return; `load` the same for `load_checkpoint` with
verification (sizes, and CRC-32 for format 2: what a resume does). Before each load the checkpoint's pages are
dropped from the page cache (posix_fadvise DONTNEED after the fsync'd write), so the load reads from disk as a
resume would, not from the memory the save just wrote.

Blocked time (format 2, SaveRecord): synchronous, the whole save; asynchronous, `staged_s` (collect the shards,
the small files, copy this rank's writes into the staging buffer) + `waited_s` (at the wait point, for the rest
of the background write) + `finalize_s` (manifest, rename, `latest`). Between the asynchronous save and its wait
the ranks sleep for "training": 1.5x the slowest rank's synchronous write of the same round plus 0.5 s, so the
background write can finish (the training of a GPU run would not use these cores either); `waited_s` then shows
whether it did. `write_s` is the background write itself.

Bytes per rank, from the files each rank wrote: format 1 rank 0 writes model.pt, optimizer.pt, trainer.pt,
config.yaml and manifest.json; format 2 rank r writes `__r_0.distcp` (its data), rank 0 also `.metadata`,
optimizer.pt (hparams), trainer.pt, config.yaml, manifest.json; every rank its rng_rank<r>.pt. `held` is the
logical bytes of the boxes a rank holds (model and optimizer state, `shard_bytes(save_state(...))`), `writes` those
it is assigned to write (a dp replica's chunks are written by one holder), `staged` what the asynchronous save
copied; `full` is the whole logical state (model + optimizer), what format 1 gathers.

Peak extra host memory per rank: around each save (and load), every rank runs gc and glibc's malloc_trim(0) (so
freed heap pages are given back and cannot be reused unseen), reads VmRSS from /proc/self/status as the baseline,
resets the high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0: VmHWM := VmRSS), runs the operation
(for the asynchronous save: save, sleep, wait), and reads VmHWM. Extra peak = VmHWM - baseline: the most resident
memory the operation added at any moment, the background thread's included (one address space). Page cache is not
process memory and is not counted. The goal (issue 16): format 2's extra peak on every rank is at most its own
shard plus one staging buffer (`held + writes`), where format 1 needs the full state.

Prints a table (and the load average before and after each pool: other work on this machine slows the timings)
and writes JSON (`--out`: the rows, and every rank's every round with the load average at its start). The model
must fit format 1 as well: its save adds 1.4-2.4x the full state on every rank and its load ~1.5x (measured at
LLaMA-130M; the script prints each pool's memory need). At toy sizes (`--model tiny`) fixed costs of a few MB
(DCP's buffers, the writer thread) outweigh the shards and the goal check means nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import run_gloo_ranks  # noqa: E402

MB = 1e6


def layouts(world: int) -> dict:
    """name -> (label, parallel overrides)."""
    return {
        "fssdp": (f"fssdp dp{world}", [f"parallel.dp={world}", "parallel.dp_impl=fssdp"]),
        "tp2_dp": (f"tp2 x dp{world // 2}", ["parallel.tp=2", f"parallel.dp={world // 2}"]),
    }


# ----------------------------------------------------------------------------------------------- memory probes
def proc_status() -> dict:
    """VmRSS and VmHWM of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def settle() -> None:
    """Free what Python holds and give glibc's free heap pages back to the kernel."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ExtraPeak:
    """Peak resident memory added inside the block (VmHWM after, reset at entry, minus VmRSS at entry)."""

    def __enter__(self):
        settle()
        self.baseline = proc_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self

    def __exit__(self, *exc):
        self.extra = proc_status()["VmHWM"] - self.baseline


def drop_page_cache(path: Path) -> None:
    """Evict a checkpoint's files from the page cache (they are written and fsync'd, so the pages are clean)."""
    for p in Path(path).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def files_by_rank(path: Path, world: int) -> list:
    """[{data, other}] bytes of the files each rank wrote (see the module docstring for who writes what)."""
    out = [dict(data=0, other=0) for _ in range(world)]
    for p in Path(path).iterdir():
        name, size = p.name, p.stat().st_size
        if name.startswith("rng_rank"):
            out[int(name[len("rng_rank") : -len(".pt")])]["other"] += size
        elif name.endswith(".distcp"):
            out[int(name[2:].split("_")[0])]["data"] += size
        elif name.startswith(("model", "optimizer")) and Path(path, "model.pt").exists():
            out[0]["data"] += size  # format 1 (one pipeline stage here)
        else:
            out[0]["other"] += size
    return out


# ----------------------------------------------------------------------------------------------- on the ranks
def build_trainer(args, layout: str, rank: int, run_dir: Path):
    """megaeff's Trainer for this layout, one training step taken (the optimizer state exists)."""
    from megaeff.config import compose
    from megaeff.distributed.dims import ParallelDims
    from megaeff.train.trainer import Trainer

    train = "micro_batch_size=1 steps=2 eval_interval=0 plot=false threads=1 ckpt_interval=0 resume=none".split()
    overrides = [f"model={args.model}", "method=dense", f"data.seq_len={args.seq}", "optim.warmup_steps=0"]
    overrides += [f"train.{o}" for o in train] + [f"run_dir={run_dir}", *layouts(args.world)[layout][1]]
    cfg = compose(overrides)
    dims = ParallelDims.from_config(cfg.parallel, world_size=args.world, rank=rank)
    dims.build_groups()
    with contextlib.redirect_stdout(io.StringIO()):
        tr = Trainer(cfg, dims, run_dir)
        tr.train_step()
    return tr


def fingerprint(tr) -> float:
    """A float64 sum over this rank's parameters and optimizer state (equal before a save and after its load)."""
    import torch

    total = sum(float(p.detach().double().sum()) for p in tr.model.parameters())
    for st in tr.optimizer.state.values():
        total += sum(float(v.double().sum()) for v in st.values() if torch.is_tensor(v))
    return total


def timed(fn, barrier):
    """(result, seconds, extra peak bytes) of `fn()` started together on every rank."""
    with ExtraPeak() as peak:
        barrier()
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    return result, seconds, peak.extra


def load_into(tr, path: Path) -> dict:
    from megaeff.train.checkpoint import load_checkpoint

    kw = dict(rank=tr.dims.rank, logical=tr.parallel.state, world_size=tr.dims.world_size)
    return load_checkpoint(path, model=tr.model, optimizer=tr.optimizer, group=tr.checkpointer.group, **kw)


def trainer_state(tr) -> dict:
    return {"step": tr.step, "consumed_samples": tr.consumed_samples, "scheduler": tr.scheduler.state_dict()}


def round_v1(tr, root: Path, step: int, barrier) -> dict:
    """Format 1: save_v1, then load it."""
    from megaeff.config import to_yaml
    from megaeff.train.checkpoint import save_v1

    def save():
        return save_v1(
            root,
            step,
            model=tr.model,
            optimizer=tr.optimizer,
            trainer_state=trainer_state(tr),
            config_yaml=to_yaml(tr.cfg),
            rank=tr.dims.rank,
            world_size=tr.dims.world_size,
            logical=tr.parallel.state,
        )

    path, save_s, save_extra = timed(save, barrier)
    return dict(save_s=save_s, save_extra=save_extra, **load_round(tr, path, barrier))


def load_round(tr, path: Path, barrier) -> dict:
    """Load `path` (page cache dropped first), check the state came back, count the files, remove them."""
    before = fingerprint(tr)
    if tr.dims.rank == 0:
        drop_page_cache(path)
    _, load_s, load_extra = timed(lambda: load_into(tr, path), barrier)
    files = files_by_rank(path, tr.dims.world_size)
    barrier()
    if tr.dims.rank == 0:
        shutil.rmtree(path)
    return dict(load_s=load_s, load_extra=load_extra, files=files, roundtrip_ok=fingerprint(tr) == before)


def round_v2(tr, sync, asyn, step: int, barrier, max_over_ranks) -> dict:
    """Format 2: a synchronous save and its load, then an asynchronous save (sleep for "training", then wait)."""
    from megaeff.config import to_yaml

    kw = dict(model=tr.model, optimizer=tr.optimizer, logical=tr.parallel.state, config_yaml=to_yaml(tr.cfg))
    path, save_s, save_extra = timed(lambda: sync.save(step, trainer_state=trainer_state(tr), **kw), barrier)
    rec = sync.records[-1]
    out = dict(save_s=save_s, save_extra=save_extra, sync=record_dict(rec), **load_round(tr, path, barrier))
    window = 1.5 * max_over_ranks(rec.write_s) + 0.5

    def save_async():
        asyn.save(step + 1, trainer_state=trainer_state(tr), **kw)
        time.sleep(window)  # "training" while the background thread writes
        return asyn.wait()

    path, async_s, async_extra = timed(save_async, barrier)
    out.update(async_wall_s=async_s, async_extra=async_extra, window_s=window, asyn=record_dict(asyn.records[-1]))
    barrier()
    if tr.dims.rank == 0:
        shutil.rmtree(path)
    return out


def record_dict(rec) -> dict:
    keys = ("shard_bytes", "held_bytes", "staged_bytes", "staged_s", "waited_s", "finalize_s", "write_s")
    return dict({k: getattr(rec, k) for k in keys}, blocked_s=rec.blocked_s)


def _worker(rank: int, job, port: int, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from megaeff.train.checkpoint import Checkpointer, save_state, shard_bytes

    args, layout, fmt, work = job
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, args.world, rank == 0, timeout=timedelta(seconds=1800))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=args.world, timeout=timedelta(seconds=1800))
    t0 = time.perf_counter()
    tr = build_trainer(args, layout, rank, work / "run")
    state = save_state(tr.model, tr.optimizer, tr.parallel.state)
    held = shard_bytes(state)
    full = sum(t.size().numel() * t.dtype.itemsize for t in state.values())
    del state
    info = dict(build_s=time.perf_counter() - t0, held_bytes=held, full_bytes=full, rounds=[])

    def max_over_ranks(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    quiet = dict(rank=rank, world_size=args.world, keep_last=1, log=lambda line: None)
    if fmt == "v2":
        sync = Checkpointer(work / "v2_sync", async_save=False, **quiet)
        asyn = Checkpointer(work / "v2_async", async_save=True, **quiet)
    for r in range(args.rounds):
        load_avg = os.getloadavg()
        settle()
        rss_before = proc_status()["VmRSS"]
        if fmt == "v1":
            out = round_v1(tr, work / "v1", 100 + r, dist.barrier)
        else:
            out = round_v2(tr, sync, asyn, 100 + 2 * r, dist.barrier, max_over_ranks)
        info["rounds"].append(dict(out, loadavg=load_avg, rss_before=rss_before))
        if rank == 0:
            print(f"  {layout} format {fmt[1]} round {r + 1}: save {out['save_s']:.1f} s, load {out['load_s']:.1f} s")
    if fmt == "v2":
        sync.close()
        asyn.close()
    tr.close()
    results.put((rank, info))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- summary
def median_round(per_rank: list, key) -> float:
    """Median over rounds of the slowest rank's value."""
    return statistics.median(max(key(r["rounds"][i]) for r in per_rank) for i in range(len(per_rank[0]["rounds"])))


def peak_by_rank(per_rank: list, key) -> list:
    """Per rank, the largest value over rounds."""
    return [max(key(rd) for rd in r["rounds"]) for r in per_rank]


def summarize(label: str, fmt: str, per_rank: list) -> list:
    """Table rows of one pool: format 1, or format 2 sync and async."""
    held = [r["held_bytes"] for r in per_rank]
    full = per_rank[0]["full_bytes"]
    ok = all(rd["roundtrip_ok"] for r in per_rank for rd in r["rounds"])
    files = [per_rank[0]["rounds"][-1]["files"][k] for k in range(len(per_rank))]
    base = dict(
        layout=label,
        full_mb=full / MB,
        held_mb=[h / MB for h in held],
        data_written_mb=[f["data"] / MB for f in files],
        other_written_mb=[f["other"] / MB for f in files],
        load_s=median_round(per_rank, lambda rd: rd["load_s"]),
        load_extra_mb=[x / MB for x in peak_by_rank(per_rank, lambda rd: rd["load_extra"])],
        roundtrip_ok=ok,
        build_s=max(r["build_s"] for r in per_rank),
        # each rank's largest resident memory (before a round + its largest extra), summed: what the machine needs
        peak_resident_sum_gb=sum(
            max(
                rd["rss_before"] + max(rd[k] for k in ("save_extra", "load_extra", "async_extra") if k in rd)
                for rd in r["rounds"]
            )
            for r in per_rank
        )
        / 1e9,
    )
    save_extra = peak_by_rank(per_rank, lambda rd: rd["save_extra"])
    if fmt == "v1":
        row = dict(base, format="1 gather", save_s=median_round(per_rank, lambda rd: rd["save_s"]))
        row.update(save_extra_mb=[x / MB for x in save_extra], blocked_s=row["save_s"], staged_mb=[0.0] * len(held))
        return [row]
    writes = [r["rounds"][-1]["sync"]["shard_bytes"] for r in per_rank]
    budget = [h + w for h, w in zip(held, writes)]
    sync = dict(base, format="2 DCP sync", save_s=median_round(per_rank, lambda rd: rd["save_s"]))
    sync.update(
        save_extra_mb=[x / MB for x in save_extra],
        blocked_s=median_round(per_rank, lambda rd: rd["sync"]["blocked_s"]),
        staged_mb=[0.0] * len(held),
        writes_mb=[w / MB for w in writes],
        budget_mb=[b / MB for b in budget],
        goal_met=all(x <= b for x, b in zip(save_extra, budget)),
    )
    async_extra = peak_by_rank(per_rank, lambda rd: rd["async_extra"])
    asyn = dict(base, format="2 DCP async", save_s=median_round(per_rank, lambda rd: rd["asyn"]["write_s"]))
    asyn.update(
        save_extra_mb=[x / MB for x in async_extra],
        blocked_s=median_round(per_rank, lambda rd: rd["asyn"]["blocked_s"]),
        blocked_parts_s={
            k: median_round(per_rank, lambda rd, k=k: rd["asyn"][k]) for k in ("staged_s", "waited_s", "finalize_s")
        },
        window_s=median_round(per_rank, lambda rd: rd["window_s"]),
        staged_mb=[r["rounds"][-1]["asyn"]["staged_bytes"] / MB for r in per_rank],
        writes_mb=[w / MB for w in writes],
        budget_mb=[b / MB for b in budget],
        goal_met=all(x <= b for x, b in zip(async_extra, budget)),
        load_s=None,
        load_extra_mb=None,
    )
    return [sync, asyn]


def fmt_list(values, spec=".0f") -> str:
    """Per-rank values as `a/b/c/d`, or `a (each)` when they print the same."""
    if values is None:
        return "-"
    text = [format(v, spec) for v in values]
    return f"{text[0]} (each)" if len(set(text)) == 1 and len(text) > 1 else "/".join(text)


def goal_lines(rows: list) -> list:
    """Issue 16's goal, per layout: format 2's extra save peak within `held + writes` on every rank, against
    format 1's."""
    lines = []
    for label in dict.fromkeys(r["layout"] for r in rows):
        mine = {r["format"]: r for r in rows if r["layout"] == label}
        old = mine.get("1 gather")
        new = [r for f, r in mine.items() if f.startswith("2")]
        text = f"{label}: "
        if new:
            worst = max(max(r["save_extra_mb"]) for r in new)
            budget = min(min(r["budget_mb"]) for r in new)
            met = all(r["goal_met"] for r in new)
            text += f"format 2 extra peak <= {worst:.0f} MB per rank, budget (own shard + staging buffer) "
            text += f">= {budget:.0f} MB: {'met' if met else 'NOT met'}"
        if old:
            extra = old["save_extra_mb"]
            text += f"; format 1: {min(extra):.0f}-{max(extra):.0f} MB on every rank "
            text += f"({min(extra) / old['full_mb']:.1f}-{max(extra) / old['full_mb']:.1f}x the full state)"
        lines.append(text)
    return lines


def print_table(rows: list) -> None:
    head = (
        f"{'layout':<12} {'format':<12} {'save s':>7} {'load s':>7} {'blocked s':>9}  "
        f"{'written MB per rank':<20} {'held MB':<12} {'staged MB':<12} "
        f"{'extra peak MB, save':<24} {'extra peak MB, load':<24} goal"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        load = f"{r['load_s']:>7.1f}" if r["load_s"] is not None else f"{'-':>7}"
        goal = {True: "met", False: "NOT met", None: "-"}[r.get("goal_met")]
        print(
            f"{r['layout']:<12} {r['format']:<12} {r['save_s']:>7.1f} {load} {r['blocked_s']:>9.2f}  "
            f"{fmt_list(r['data_written_mb']):<20} {fmt_list(r['held_mb']):<12} {fmt_list(r['staged_mb']):<12} "
            f"{fmt_list(r['save_extra_mb']):<24} {fmt_list(r['load_extra_mb']):<24} {goal}"
        )


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_130m", help="conf/model/<name>.yaml")
    ap.add_argument("--world", type=int, default=4, help="gloo ranks (even: the tp2 layout needs pairs)")
    ap.add_argument("--layouts", nargs="+", default=["fssdp", "tp2_dp"], choices=["fssdp", "tp2_dp"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq", type=int, default=32, help="tokens of the one training step")
    ap.add_argument("--work-dir", type=Path, default=None, help="where checkpoints go (default: a temp dir, removed)")
    ap.add_argument("--out", type=Path, default=Path("bench_checkpoint.json"))
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    base = Path(tempfile.mkdtemp(prefix="megaeff_ckpt_bench_", dir=args.work_dir))
    rows, pools = [], []
    t_start = time.time()
    try:
        for i, layout in enumerate(args.layouts):
            label = layouts(args.world)[layout][0]
            for fmt in ("v1", "v2") if i % 2 == 0 else ("v2", "v1"):
                work = base / f"{layout}_{fmt}"
                before = os.getloadavg()
                t0 = time.time()
                per_rank = run_gloo_ranks(_worker, (args, layout, fmt, work), args.world)
                after = os.getloadavg()
                pools.append(
                    dict(
                        layout=label,
                        format=fmt,
                        loadavg_before=before,
                        loadavg_after=after,
                        seconds=time.time() - t0,
                        per_rank=per_rank,
                    )
                )
                print(
                    f"{label} format {fmt[1]}: {time.time() - t0:.0f} s, load average {before[0]:.2f} -> {after[0]:.2f}"
                )
                rows += summarize(label, fmt, per_rank)
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"\n{args.model}, method=dense, fp32 + AdamW, {args.world} gloo ranks, median of {args.rounds} rounds "
        f"(time: slowest rank; per-rank lists: rank 0/1/...; extra peak: largest over rounds); MB = 1e6 bytes; "
        f"full state (model + optimizer) {rows[0]['full_mb']:.0f} MB; total {time.time() - t_start:.0f} s"
    )
    print_table(rows)
    print("async: `save s` is the background write; blocked = staging + waiting + finalize")
    for label, fmt in dict.fromkeys((r["layout"], r["format"][0]) for r in rows):
        row = next(r for r in rows if r["layout"] == label and r["format"][0] == fmt)
        print(
            f"{label} format {fmt}: largest resident memory of each rank (before a round + its largest extra "
            f"peak), summed over ranks: {row['peak_resident_sum_gb']:.1f} GB"
        )
    print("goal (peak extra memory per rank at most its own shard plus one staging buffer):")
    for line in goal_lines(rows):
        print("  " + line)
    bad = [f"{r['layout']} {r['format']}" for r in rows if not r["roundtrip_ok"]]
    print("round trips: " + ("state equal after every load" if not bad else f"DIFFERENT after {', '.join(bad)}"))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps(dict(config=config, rows=rows, pools=pools), indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
