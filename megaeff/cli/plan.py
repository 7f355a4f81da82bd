"""megaeff-plan: the fastest tp x cp x dp x pp layout of a model on a cluster, within its memory.

    megaeff-plan --model llama_7b --method dense --set precision=bf16 --seq-len 2048 --global-batch 64 \\
        --preset h100_sxm --nodes 1
    megaeff-plan --model llama_70b --method dense --set precision=bf16 --seq-len 4096 --global-batch 512 \\
        --preset h100_sxm --nodes 8 --out-dir plans/70b
    megaeff-plan --model llama_7b --method lost_7b --set precision=coat_bf16 --seq-len 2048 --global-batch 16 \\
        --preset h100_sxm --nodes 1 --gpus-per-node 1 --gpu-mem-gb 24          # one 24 GB GPU

Every candidate layout (tp, cp with its scheme, dp by all-reduce or FSSDP with its gather dtype, pp with
1F1B or interleaved stages, sequence parallelism, activation checkpointing, optimizer in backward, micro-batch
size) is validated by megaeff's own config checks; its per-rank peak memory and communication bytes per
group come from one training step of the real code on fake tensors (megaeff/train/memory/fake_step.py) at 1
and 2 layers per pipeline stage, extrapolated to the real depth; its step time from FLOPs, the bandwidth of the
link each group crosses and the pipeline schedule simulator. docs/planner.md has the cost model, the overlap
rules and the limits. The search is branch and bound: layouts whose memory floor (weights + max(gradients,
moments)) exceeds the budget are rejected unmeasured, the rest measured in order of a lower bound on their step
time until no unmeasured layout can enter the top N (the exhaustive search's rows; the footer counts where
every layout went). Prints the top layouts, the best one as Hydra overrides, the rejected ones by reason;
--out-dir writes <out-dir>/parallel/<name>.yaml, overrides.txt and plan.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from megaeff.errors import EXIT_USAGE, MegaeffError


def build_parser() -> argparse.ArgumentParser:
    from megaeff.train.planner.cluster import PRESETS  # light: no torch model is built

    p = argparse.ArgumentParser(
        prog="megaeff-plan",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    g = p.add_argument_group("model and training")
    g.add_argument("--model", default="llama_7b", help="model flavor (conf/model/*.yaml), default llama_7b")
    g.add_argument("--method", default="dense", help="method preset (conf/method/*.yaml), default dense")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any Hydra override, repeatable: precision=bf16, experiment=lost_7b_16gb, model.max_seq_len=8192, ...",
    )
    g.add_argument(
        "--precision",
        default=None,
        metavar="P1,P2,...|auto",
        help="precision presets enumerated as one more axis (comma-separated): fp32, bf16, bf16_w16 (bf16 weights, "
        "no fp32 master), fp8act_w16 (bf16 autocast + FP8 activations saved for backward + bf16 weights), "
        "coat_bf16, coat_bf16_w16; auto: all but fp32 (docs/planner.md). Each sets every precision.* field "
        "over the base's. Default: only the base config's precision (--set precision=...)",
    )
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (data.seq_len), default 2048")
    g.add_argument("--global-batch", type=int, default=64, help="sequences per optimizer step, default 64")
    c = p.add_argument_group("cluster (a preset, any field overridden; or every field)")
    c.add_argument("--preset", choices=sorted(PRESETS), default=None, help="h100_sxm or a100_80gb (docs/planner.md)")
    c.add_argument("--nodes", type=int, default=None, help="nodes, default 1")
    c.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node, default 8")
    c.add_argument("--gpu-mem-gb", type=float, default=None, help="memory per GPU in GB (1e9 bytes)")
    c.add_argument("--intra-gbps", type=float, default=None, help="intra-node GB/s per GPU per direction (NVLink)")
    c.add_argument("--inter-gbps", type=float, default=None, help="inter-node GB/s per GPU per direction (the NIC)")
    c.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak TFLOP/s per GPU")
    s = p.add_argument_group("cost model and search")
    s.add_argument(
        "--efficiency",
        type=float,
        default=0.5,
        help="fraction of peak FLOP/s the kernels reach, default 0.5 (docs/planner.md: why)",
    )
    s.add_argument(
        "--headroom",
        type=float,
        default=0.1,
        help="fraction of GPU memory held back for what the tracker does not count (CUDA context, NCCL, "
        "allocator fragmentation), default 0.1",
    )
    s.add_argument("--max-micro-batch", type=int, default=4, help="largest micro-batch size tried, default 4")
    s.add_argument("--cp-impls", default="ring,ulysses", help="context-parallel schemes tried, default ring,ulysses")
    s.add_argument("--gather-dtypes", default="fp32,bf16,fp8", help="FSSDP gather dtypes tried, default fp32,bf16,fp8")
    s.add_argument(
        "--min-cp-tokens", type=int, default=1024, help="smallest context shard (seq-len / cp) tried, default 1024"
    )
    s.add_argument("--max-measure", type=int, default=200, help="most layouts measured on fake tensors, default 200")
    s.add_argument(
        "--time-budget", type=float, default=None, help="stop measuring after this many seconds (default: no limit)"
    )
    o = p.add_argument_group("output")
    o.add_argument("--top", type=int, default=5, help="layouts in the table, default 5")
    o.add_argument("--out-dir", default=None, help="write parallel/<name>.yaml, overrides.txt and plan.json here")
    o.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    return p


def run(args) -> int:
    from megaeff.train.planner.cluster import make_cluster
    from megaeff.train.planner.enumerate import AUTO_PRECISIONS, PRECISIONS, Options
    from megaeff.train.planner.report import format_plan, to_json, write_outputs
    from megaeff.train.planner.search import base_overrides, make_plan

    for name in ("seq_len", "global_batch", "top", "max_micro_batch", "max_measure"):
        if getattr(args, name) < 1:
            raise MegaeffError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.efficiency <= 1 or not 0 <= args.headroom < 1:
        raise MegaeffError("--efficiency must be in (0, 1] and --headroom in [0, 1)")
    cluster = make_cluster(
        args.preset,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_mem_gb=args.gpu_mem_gb,
        intra_gbps=args.intra_gbps,
        inter_gbps=args.inter_gbps,
        peak_tflops=args.peak_tflops,
    )
    from megaeff.config.choices import CpImpl, FssdpGatherDtype

    for flag, given, choices in (
        ("--cp-impls", args.cp_impls, CpImpl),
        ("--gather-dtypes", args.gather_dtypes, FssdpGatherDtype),
    ):
        bad = [x for x in given.split(",") if x not in choices.__members__]
        if bad:
            raise MegaeffError(f"{flag}: unknown {bad[0]!r}; available: {', '.join(choices.__members__)}")
    precisions = ("",)
    if args.precision:
        precisions = AUTO_PRECISIONS if args.precision == "auto" else tuple(args.precision.split(","))
        bad = [x for x in precisions if x not in PRECISIONS]
        if bad:
            raise MegaeffError(f"--precision: unknown {bad[0]!r}; available: auto, {', '.join(PRECISIONS)}")
    opts = Options(
        precisions=precisions,
        max_micro_batch=args.max_micro_batch,
        cp_impls=tuple(args.cp_impls.split(",")),
        gather_dtypes=tuple(args.gather_dtypes.split(",")),
        min_cp_tokens=args.min_cp_tokens,
    )
    base = base_overrides(args.model, args.method, args.set, args.seq_len)
    plan = make_plan(
        base,
        cluster,
        args.global_batch,
        efficiency=args.efficiency,
        headroom=args.headroom,
        top=args.top,
        max_measure=args.max_measure,
        time_budget=args.time_budget,
        opts=opts,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(to_json(plan), indent=2) if args.json else format_plan(plan))
    if args.out_dir:
        path = write_outputs(plan, args.out_dir)
        print(f"wrote {path}", file=sys.stderr)
    return 0 if plan.top else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return run(args)
    except MegaeffError as exc:
        print(f"megaeff-plan: error: {exc}", file=sys.stderr)
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"megaeff-plan: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
