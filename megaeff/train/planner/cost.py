"""The cost model: FLOPs, compute time, exposed communication, pipeline bubble, step time, MFU.

    step time = compute (+ recompute) + exposed communication + pipeline bubble

FLOPs per token (training = 3 x forward; 2 FLOPs per multiply-add):
    model = 6 (linear + head) + 12 L S d
where `linear` is the forward multiply-adds per token of every factory-built projection as the method computes
them (`linear_macs_per_token`, megaeff/layers/linear.py: dense, or LOST / SLTrain / lowrank's actual factors
and sparse products), head = d x vocab, and 12 L S d is attention's QK^T and AV over the full sequence S (the
PaLM / torchtitan convention, no causal halving, so MFU compares with theirs). Activation checkpointing adds
one forward of the blocks, 2 (linear + 2 L S d), counted in the time but not in MFU's model FLOPs.
Compute time per rank = tokens per step x FLOPs per token / world / (peak x efficiency): the work splits
evenly over every rank (tp, cp, dp, pp); kernel efficiency is one stated number (no dependence on the GEMM
shape, the micro-batch size or FP8: COAT's FP8 GEMMs are timed at the bf16 peak).

Communication time of a counter `<group>/<kind>` (bytes per step from the dry run, comm.py's payload
convention) = payload x ring factor / bandwidth of the link the group crosses (cluster.py):
all-reduce 2(p-1)/p; all-gather, reduce-scatter, all-to-all (and FSSDP's sparse forms) (p-1)/p; p2p 1.
Overlap rules (what is exposed):
- dp gradient all-reduce (`dp_cp` / `dp` all_reduce) with `parallel.overlap_grad_reduce`: hidden behind the
  last micro-batch's backward except the last bucket: max(T - backward of one micro-batch, T of one bucket);
- FSSDP's gathers and reduce-scatters (`dp_cp`): prefetched, hidden behind the step's compute except the first
  transfer: max(T - compute, T / (2 x layers per rank x micro-batches));
- cp's ring p2p (ring, LightSeq): overlapped with attention's block compute: max(0, T - attention time);
- everything else is exposed: tp's all-reduces / all-gathers / reduce-scatters (on the critical path), pipeline
  p2p, Ulysses' all-to-all, scalars.
Bubble: the schedule simulator's idle / compute (megaeff/distributed/pipeline/schedule.py, backward = 2 forwards,
3 with activation checkpointing) x compute time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from megaeff.config.schema import Config
from megaeff.distributed.pipeline.schedule import bubble_fraction, build_schedule
from megaeff.layers.linear import linear_macs_per_token
from megaeff.models.llama import build_llama
from megaeff.train.planner.cluster import Cluster, group_size, link_gbps
from megaeff.train.planner.enumerate import Layout
from megaeff.train.planner.measure import RankCost

RING_FACTOR = {"all_reduce": lambda p: 2 * (p - 1) / p, "p2p_send": lambda p: 1.0}
FSSDP_KINDS = ("all_gather", "reduce_scatter", "sparse_all_gather", "sparse_reduce_scatter", "all_to_all")


def ring_factor(kind: str, p: int) -> float:
    return RING_FACTOR.get(kind, lambda p: (p - 1) / p)(p)


@dataclass
class Flops:
    """Per token: `model` (what MFU counts), `recompute` (activation checkpointing's extra forward),
    `attention` (part of `model`: the 12 L S d term)."""

    model: float
    recompute: float
    attention: float


class FlopCounter:
    """FLOPs per token of the plan's model (built once on the meta device), per tokens-per-call."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.net = build_llama(cfg.model, cfg.method, device="meta")

    def per_token(self, tokens_per_call: int) -> Flops:
        m, seq = self.cfg.model, self.cfg.data.seq_len
        linear = linear_macs_per_token(self.net, tokens_per_call)
        attn_macs = 2 * m.n_layers * seq * m.dim
        return Flops(6 * (linear + m.dim * m.vocab_size) + 6 * attn_macs, 2 * (linear + attn_macs), 6 * attn_macs)


@dataclass
class Cost:
    compute_s: float  # model FLOPs + recompute, per rank
    recompute_s: float
    bubble_s: float
    bubble_fraction: float
    exposed_s: Dict[str, float]  # exposed seconds per comm counter
    comm_s: Dict[str, float]  # full transfer seconds per comm counter
    step_s: float
    mfu: float
    tokens_per_s: float
    notes: List[str] = field(default_factory=list)

    @property
    def exposed_total(self) -> float:
        return sum(self.exposed_s.values())


def compute_time(cfg: Config, flops: FlopCounter, layout: Layout, cluster: Cluster, efficiency: float):
    """(compute seconds per rank, recompute seconds, attention seconds, model FLOPs per step)."""
    tokens = layout.micro_batch * layout.grad_accum * layout.dp * cfg.data.seq_len
    f = flops.per_token(layout.micro_batch * cfg.data.seq_len // layout.cp)
    world = layout.tp * layout.cp * layout.dp * layout.pp
    rate = cluster.peak_tflops * 1e12 * efficiency
    recompute = f.recompute * tokens / world / rate if layout.activation_checkpointing else 0.0
    return f.model * tokens / world / rate + recompute, recompute, f.attention * tokens / world / rate, f.model * tokens


def bubble(layout: Layout, compute_s: float) -> float:
    """Idle / busy of the simulated schedule (0 without a pipeline)."""
    if layout.pp == 1:
        return 0.0
    sched = build_schedule(layout.pp_schedule, layout.pp, layout.grad_accum, layout.pp_virtual)
    t_b = 3.0 if layout.activation_checkpointing else 2.0
    return bubble_fraction(sched, layout.pp, layout.pp_virtual, 1.0, t_b)


def _exposed(
    cfg: Config, layout: Layout, key: str, t: float, nbytes: int, compute_s: float, attn_s: float, bw: float, p: int
) -> float:
    group, kind = key.split("/", 1)
    bwd_one = compute_s * (2 / 3) / layout.grad_accum  # one micro-batch's backward (recompute ignored: lower)
    if group in ("dp", "dp_cp") and kind == "all_reduce" and layout.dp_impl == "allreduce":
        if not cfg.parallel.overlap_grad_reduce:
            return t
        bucket = min(nbytes, cfg.parallel.bucket_mb * 1e6) * ring_factor(kind, p) / (bw * 1e9)
        return max(t - bwd_one, bucket)
    if group == "dp_cp" and kind in FSSDP_KINDS and layout.dp_impl == "fssdp":
        layers = cfg.model.n_layers // layout.pp
        return max(t - compute_s, t / (2 * layers * layout.grad_accum))
    if group == "cp" and kind == "p2p_send":
        return max(0.0, t - attn_s)
    return t


def step_cost(
    cfg: Config, flops: FlopCounter, layout: Layout, cluster: Cluster, efficiency: float, ranks: List[RankCost]
) -> Cost:
    """The cost of `layout` from its measured ranks (the slowest rank sets the step)."""
    compute_s, recompute_s, attn_s, model_flops = compute_time(cfg, flops, layout, cluster, efficiency)
    frac = bubble(layout, compute_s)
    worst = None
    for rc in ranks:
        comm_s, exposed_s = {}, {}
        for key, nbytes in rc.comm.items():
            group, kind = key.split("/", 1)
            p = group_size(layout.degrees, group)
            bw = link_gbps(cluster, layout.degrees, group)
            comm_s[key] = nbytes * ring_factor(kind, p) / (bw * 1e9)
            exposed_s[key] = _exposed(cfg, layout, key, comm_s[key], nbytes, compute_s, attn_s, bw, p)
        if worst is None or sum(exposed_s.values()) > sum(worst[1].values()):
            worst = (comm_s, exposed_s)
    comm_s, exposed_s = worst
    step = compute_s * (1 + frac) + sum(exposed_s.values())
    world = cluster.world
    tokens = layout.micro_batch * layout.grad_accum * layout.dp * cfg.data.seq_len
    mfu = model_flops / (step * world * cluster.peak_tflops * 1e12)
    return Cost(compute_s, recompute_s, compute_s * frac, frac, exposed_s, comm_s, step, mfu, tokens / step)
