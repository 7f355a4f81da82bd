#!/usr/bin/env python
"""Training-state memory and bytes per step: plain DP, dense FSDP2 and FSSDP on LLaMA-60M, gloo CPU ranks.

    python tools/bench/fssdp.py --dp 4 --seq 64 --out bench_fssdp.json

Spawns `--dp` gloo ranks on this machine. Models: conf/model/llama_60m.yaml with dense linear layers, and with
LOST (conf/method/lost_60m.yaml: r=128, 5% channels), float32, AdamW (COAT for one row). Each layout runs
`--steps` training steps of one micro-batch of `--batch` x `--seq` random tokens per rank (loss / global tokens)
and reports the last one, per rank:

- params / grads / optim: bytes of the tensors this rank holds after the step (optimizer: its state tensors);
- gathered: parameter bytes all-gathered (FSSDP's sparse embedding rows included) -- the payload rule of
  megaeff/distributed/comm.py: a gather records the gathered tensor, own shard included;
- reduced: gradient bytes reduce-scattered (input, own slot included) plus all-reduced;
- other: all-to-all bytes (the token ids of FSSDP's sparse embedding lookup).

Layouts:
- `dp allreduce`: replicated model, GradReducer (megaeff/distributed/data_parallel/bucketed.py), dense and LOST;
- `fsdp2`: torch's `fully_shard` (FSDP2) on every Block and the root, reshard_after_forward on (its default;
  the root is never resharded after forward), run side by side on the same gloo ranks; its collectives are
  counted by wrapping `torch.distributed.all_gather_single` / `reduce_scatter_single` / `all_reduce` with the
  same payload rule; dense (the anchor) and LOST (FSDP2 of the compact tensors, for reference);
- `fssdp`: megaeff/distributed/fssdp/engine.py on the LOST model, gathers in fp32 / bf16 / fp8, resharded after forward,
  plus one row without resharding and one with COAT (FP8 moments) as the optimizer.

The sparse embedding gathers only the rows of a rank's distinct tokens, so its bytes grow with the tokens per
rank per step (at most the whole table); `--seq`/`--batch` set that. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import init_gloo_rank, run_gloo_ranks  # noqa: E402

LAYOUTS = [
    # (row label, model, layout, options)
    ("dp allreduce, dense", "dense", "dp", {}),
    ("fsdp2, dense (anchor)", "dense", "fsdp2", {}),
    ("dp allreduce, lost", "lost", "dp", {}),
    ("fsdp2, lost", "lost", "fsdp2", {}),
    ("fssdp, lost, fp32 gather", "lost", "fssdp", dict(gather_dtype="fp32")),
    ("fssdp, lost, bf16 gather", "lost", "fssdp", dict(gather_dtype="bf16")),
    ("fssdp, lost, fp8 gather", "lost", "fssdp", dict(gather_dtype="fp8")),
    ("fssdp, lost, fp32, keep after fwd", "lost", "fssdp", dict(gather_dtype="fp32", reshard_after_forward=False)),
    ("fssdp, lost, fp8 gather, COAT", "lost", "fssdp", dict(gather_dtype="fp8", optim="coat")),
]


def load_configs():
    from omegaconf import OmegaConf

    from megaeff.config.schema import MethodConfig, ModelConfig

    model = ModelConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/llama_60m.yaml")))
    lost = MethodConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "conf/method/lost_60m.yaml")))
    return model, {"dense": MethodConfig(name="dense"), "lost": lost}


class TorchCollectiveCounter:
    """Bytes through torch.distributed's tensor collectives while active (payload rule of comm.py)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.bytes = dist, {}
        self._orig = {}

    def _wrap(self, name, kind, pick):
        orig = getattr(self.dist, name)
        self._orig[name] = orig

        def wrapped(*args, **kwargs):
            t = pick(args, kwargs)
            self.bytes[kind] = self.bytes.get(kind, 0) + t.numel() * t.element_size()
            return orig(*args, **kwargs)

        setattr(self.dist, name, wrapped)

    def __enter__(self):
        self._wrap("all_gather_single", "all_gather", lambda a, k: k.get("output_tensor", a[0] if a else None))
        self._wrap("reduce_scatter_single", "reduce_scatter", lambda a, k: k.get("input", a[1] if len(a) > 1 else None))
        self._wrap("all_reduce", "all_reduce", lambda a, k: k.get("tensor", a[0] if a else None))
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(self.dist, name, orig)


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _worker(rank: int, args, port: int, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from megaeff.config.schema import OptimConfig
    from megaeff.distributed.data_parallel.bucketed import GradReducer
    from megaeff.distributed.fssdp.engine import FSSDP
    from megaeff.distributed.grad_norm import clip_grad_norm_
    from megaeff.distributed.logical_state import annotate_parameters
    from megaeff.models.init import materialize
    from megaeff.models.llama import build_llama
    from megaeff.optim.builder import build_optimizer

    dims = init_gloo_rank(rank, args.dp, port, timeout_s=900)
    mcfg, methods = load_configs()
    mcfg.max_seq_len = max(args.seq, 16)
    masters = {}
    for kind in sorted({m for _, m, _, _ in LAYOUTS}):
        t0 = time.perf_counter()
        model = materialize(build_llama(mcfg, methods[kind], device="meta"), torch.device("cpu"), 0, mcfg.init_std)
        annotate_parameters(model)
        masters[kind] = model
        if rank == 0:
            print(
                f"built {kind} llama_60m ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) in "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    tokens = args.dp * args.batch * args.seq
    out = []
    for label, kind, layout, options in LAYOUTS:
        options = dict(options)
        optim = options.pop("optim", "adamw")
        ocfg = OptimConfig(name="coat_adamw" if optim == "coat" else "adamw", lr=1e-4, impl="foreach")
        model = copy.deepcopy(masters[kind])
        fs = reducer = None
        if layout == "fssdp":
            fs = FSSDP(model, dims, **options)
        elif layout == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (args.dp,))
            for block in model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        if layout == "fsdp2":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        else:
            opt, _ = build_optimizer(model, ocfg, dims.device)
        if layout == "dp":
            reducer = GradReducer(list(model.named_parameters()), dims)
        steps = []
        for step in range(args.steps):
            g = torch.Generator().manual_seed(1000 * step + rank)
            batch = torch.randint(0, mcfg.vocab_size, (args.batch, args.seq + 1), generator=g)
            dims.comm_stats.reset()
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            with TorchCollectiveCounter() as counter:
                logits = model(batch[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum") / tokens
                if reducer is not None:
                    reducer.prepare(final=True)
                loss.backward()
                if reducer is not None:
                    reducer.finish()
                if fs is not None:
                    fs.finish()
                    clip_grad_norm_(list(fs.parameters()), 1.0, dims, dp_sharded=True)
                elif layout == "fsdp2":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                else:
                    from megaeff.distributed.grad_norm import clip_grad_norm_ as dp_clip

                    dp_clip(list(model.parameters()), 1.0, dims)
                opt.step()
            seconds = time.perf_counter() - t0
            if layout == "fsdp2":
                recorded = {f"dp_cp/{k}": v for k, v in counter.bytes.items()}
            else:
                recorded = {k: v for k, v in dims.comm_stats.snapshot().items() if k.startswith("dp_cp")}
            params = list(model.parameters())
            steps.append(
                dict(
                    recorded=recorded,
                    seconds=seconds,
                    params=local_bytes(params),
                    grads=local_bytes(p.grad for p in params),
                    optim=local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
                    peak_gathered=fs.peak_gathered_bytes if fs is not None else None,
                )
            )
        if fs is not None:
            fs.remove()
        out.append(dict(label=label, model=kind, layout=layout, options=options, optim=optim, steps=steps))
        if rank == 0:
            print(f"  ran {label}: {steps[-1]['seconds']:.1f} s/step", flush=True)
        del model, opt, fs, reducer
    results.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def summarize(per_rank):
    rows, mb = [], 1e6
    anchor = None
    for i, cell in enumerate(per_rank[0]):
        last = [r[i]["steps"][-1] for r in per_rank]
        rec = {}
        for s in last:
            for k, v in s["recorded"].items():
                rec[k.split("/", 1)[1]] = rec.get(k.split("/", 1)[1], 0) + v / len(last)
        gathered = rec.get("all_gather", 0) + rec.get("sparse_all_gather", 0)
        reduced = rec.get("reduce_scatter", 0) + rec.get("sparse_reduce_scatter", 0) + rec.get("all_reduce", 0)
        row = dict(
            label=cell["label"],
            model=cell["model"],
            layout=cell["layout"],
            optim=cell["optim"],
            params_mb=max(s["params"] for s in last) / mb,
            grads_mb=max(s["grads"] for s in last) / mb,
            optim_mb=max(s["optim"] for s in last) / mb,
            gathered_mb=gathered / mb,
            reduced_mb=reduced / mb,
            other_mb=rec.get("all_to_all", 0) / mb,
            recorded_mean_bytes_per_rank=rec,
            peak_gathered_mb=(max(s["peak_gathered"] for s in last) / mb)
            if last[0]["peak_gathered"] is not None
            else None,
            step_seconds_rank0=statistics.median(
                s["seconds"] for s in per_rank[0][i]["steps"][1:] or per_rank[0][i]["steps"]
            ),
        )
        if cell["label"].startswith("fsdp2, dense"):
            anchor = row["gathered_mb"]
        rows.append(row)
    for row in rows:
        row["gathered_vs_fsdp2_dense"] = row["gathered_mb"] / anchor if anchor else None
    return rows


def print_table(rows):
    head = (
        f"{'layout':<36} {'params':>8} {'grads':>8} {'optim':>8} {'gathered':>9} {'reduced':>8} {'other':>6} "
        f"{'vs FSDP2':>8} {'step s':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['label']:<36} {r['params_mb']:>8.1f} {r['grads_mb']:>8.1f} {r['optim_mb']:>8.1f} "
            f"{r['gathered_mb']:>9.1f} {r['reduced_mb']:>8.1f} {r['other_mb']:>6.3f} "
            f"{r['gathered_vs_fsdp2_dense']:>8.3f} {r['step_seconds_rank0']:>7.1f}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=2, help="steps per layout; the last one is reported")
    ap.add_argument("--out", type=Path, default=Path("bench_fssdp.json"))
    args = ap.parse_args(argv)
    per_rank = run_gloo_ranks(_worker, args, args.dp)
    rows = summarize(per_rank)
    print(
        f"llama_60m, dp={args.dp}, {args.batch} x {args.seq} tokens per rank per step, fp32 master weights; "
        "MB = 1e6 bytes per rank (memory: the largest rank; bytes: mean over ranks) for the last step"
    )
    print_table(rows)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps(dict(config=config, rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
