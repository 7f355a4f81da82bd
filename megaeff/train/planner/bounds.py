"""Lower bounds that need no measurement: a layout's peak memory (the state floor) and its step time (compute +
bubble + the communication that no overlap rule can hide). The search (search.py) rejects a layout whose floor
exceeds the budget, and measures the others in order of their step-time bound until no unmeasured layout can
enter the top N (branch and bound): both bounds must never exceed what the measurement gives, or the search
would drop a layout the exhaustive search keeps. tests/unit/test_planner.py checks both against the measured
peak and step of every layout of a small enumerated space, and the search's rows against the exhaustive search.

Memory floor per rank (no temporaries), of a training step after the first (what the planner measures,
measure.py `steady_phase_peaks`):
    weights + optimizer moments + max(gradients, activations in flight [+ gradients, in a steady backward])
each parameter's bytes split over tp and pp and, under FSSDP, over dp x cp (the average share; the largest
stage, tp shard or dim-0 run holds at least it, and replicated norms only add). Weights: 2 bytes with
`precision.param_dtype=bf16`, else 4. Gradients: the weight's dtype, none with `optim.in_backward` (each is
freed as its parameter updates). Moments: AdamW's two per element, fp32 (8 bytes) or FP8 with COAT (2), none
for GaLore (projected, smaller than the parameter). The moments exist from the first step's optimizer on and
are held through every later step; the gradients all exist when backward ends (each accumulated into until
the optimizer step), which the activations of a forward need not overlap (hence the max).

Activations (`activation_parts`), from the first pipeline stage (rank 0; the layout's peak is the largest
rank's, so at least rank 0's). They are stacked on the weights and moments, or on weights + moments +
gradients at a moment where both are provably live:
- in flight: just before a backward, the forwards run and not yet backwarded are `warmup_forwards(rank 0) + 1`
  (the schedule simulator's count: 1F1B min(pp, m), interleaved min(2(pp-1) + (v-1)pp + 1, v m) chunks, GPipe
  m), 1 without a pipeline (each micro-batch's backward follows its forward), each chunk of L / (pp v) layers;
  without recompute every saved tensor of those forwards is live until its backward.
- gradients with them: in a steady-state backward (one preceded by a forward, so w + 1 in flight) that comes
  after the first backward of every chunk of the rank (every parameter then has its accumulated gradient,
  kept until the optimizer step): needs v m - w >= (v - 1) pp + 2. Not counted under FSSDP (its sharded
  gradient accumulation is not assumed live across micro-batches) nor with `optim.in_backward` (freed at once).
  Rank 0's parameters (embedding + L/pp layers) are at least the average share `state_floor_parts` uses: the
  embedding is no smaller than the head, so emb + L/pp layers >= (emb + head + L layers) / pp for pp >= 2.
- bytes per layer and micro-batch (`layer_activation_bytes`), tokens t = micro-batch x seq / cp, every tensor
  divided by tp (under sequence parallelism a rank holds a 1/tp sequence shard or 1/tp of the heads / width;
  without it, more): with recompute (parallelize.py checkpoints each block, saving only its input) the block
  input, t x dim at 2 bytes (the residual stream is fp32 or bf16). Without recompute, the tensors autograd
  keeps for backward (each a new tensor, so none is counted twice), by what megaeff's code saves: the two
  RMSNorms' inputs (>= 2 bytes; FP8 activations: E4M3 codes, 1) and, without FP8 activations, their fp32
  normalized x (kept by the product with the weight: ActivationOps.rmsnorm); the inputs of the q/k/v, o,
  gate/up and down linears (every method's linear needs its input for its weight gradient; q/k/v's and
  gate/up's counted once each) at 1 byte under FP8 activations or FP8 GEMMs, else >= 2; q, k, v after RoPE
  (new tensors, kept by every attention backward, high precision: >= 2 bytes); SwiGLU's gate and up (FP8:
  codes) and, without FP8, silu(gate) (the product's other operand), >= 2 bytes. MoE: the MLP counts its norm
  only. Left out (they only add): the attention output and log-sum-exp, autocast's extra bf16 copies of
  activations (q/k/v each cast their input), the CP ring's and the head's tensors. On the tiny pipelines of
  tests/unit/test_planner.py rank 0's peak less its weights and gradients is 1.66x (1F1B) and 1.72x
  (interleaved) this count (the test checks that 2x overshoots).
- weight copies (`layer_weight_copy_bytes`): under bf16 autocast with fp32 weights, every forward casts each
  dense linear weight to bf16 and the GEMM saves that copy for its input gradient; the pipeline runs each
  chunk's forward in its own autocast region (no cache shared across micro-batches), so each chunk in flight
  keeps its layers' copies: 2 bytes x the layer's q/k/v/o and MLP weights / tp. At LLaMA-70B shapes with one
  sequence per micro-batch these outweigh the activations (tp4, cp2: 428 MB against 203 MB per layer). FSSDP
  too: its gathers are unpacked to the weights' fp32 (fssdp/layout.py `unpack`) and only that gathered storage is
  freed after forward, not autocast's bf16 casts of it, which are the full (dp-unsharded) weights. Counted only
  where that is certain: method dense, no recompute (the checkpointed forward saves nothing), not bf16 weights
  or FP8 GEMMs / activations (no cast).

Communication floor per rank (seconds exposed under cost.py's overlap rules; cluster.py's links), from the
payloads comm.py counts, each counted low:
- tp (sequence parallelism): per layer and micro-batch, the two row-parallel outputs are reduce-scattered in the
  forward and the two sequence gathers' gradients in the backward (4 reduce-scatters of tokens x dim elements,
  at least 2 bytes: sums are never FP8), and 4 all-gathers (at least 1 byte); without sequence parallelism 4
  all-reduces of 2 bytes. tp's collectives are exposed in full. Recompute's repeats and the head are left out.
- cp with Ulysses: per layer and micro-batch at least 4 all-to-alls (q and the output forward, their gradients
  backward) of tokens x dim / tp elements at 2 bytes (attention stays high precision), exposed in full.
- pp: every rank sends each micro-batch's activation (first stage) or gradient (last stage) at least once,
  tokens x dim / tp elements at 2 bytes, exposed in full.
- FSSDP: every block weight (the 2-D tensors of `model.layers`) is gathered once per micro-batch in the forward
  (and again in the backward with `fssdp_reshard_after_forward`) at min(gather dtype, weight dtype) bytes, and
  its gradient reduce-scattered at least once per step at 2 bytes; each is exposed by max(T - compute,
  T / (2 x layers per rank x micro-batches)) (cost.py), a function that grows with T.
- dp all-reduce and cp's ring: 0 (they can hide entirely).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from megaeff.config.optim import PrecisionConfig, uses_fp8_states
from megaeff.config.schema import Config
from megaeff.distributed.pipeline.schedule import warmup_forwards
from megaeff.train.planner.cluster import Cluster, group_size, link_gbps
from megaeff.train.planner.cost import FlopCounter, bubble, compute_time, ring_factor
from megaeff.train.planner.enumerate import Layout, precision_of

GB = 1e9


@dataclass(frozen=True)
class ParamCounts:
    """What the bounds need from the model (built once on the meta device by FlopCounter)."""

    total: int  # every parameter
    block_matrices: int  # the 2-D parameters of the transformer blocks (FSSDP gathers each, every micro-batch)

    @classmethod
    def of(cls, flops: FlopCounter) -> "ParamCounts":
        net = flops.net
        blocks = sum(p.numel() for p in net.layers.parameters() if p.dim() == 2)
        return cls(sum(p.numel() for p in net.parameters()), blocks)


def _weight_bytes(pr: PrecisionConfig) -> int:
    return 2 if pr.param_dtype == "bf16" else 4


def state_floor_parts(cfg: Config, counts: ParamCounts, layout: Layout) -> Dict[str, int]:
    """This rank's least weight, gradient and moment bytes (module docstring)."""
    pr = precision_of(cfg, layout)
    shards = layout.tp * layout.pp * (layout.dp * layout.cp if layout.dp_impl == "fssdp" else 1)
    w = _weight_bytes(pr)
    grad = 0 if layout.in_backward else w
    if cfg.optim.name == "galore":
        moments = 0
    else:
        moments = 2 if uses_fp8_states(cfg.optim, pr) else 8
    n = counts.total
    return {"weights": n * w // shards, "gradients": n * grad // shards, "moments": n * moments // shards}


def layer_activation_bytes(cfg: Config, layout: Layout) -> int:
    """Bytes one micro-batch's forward certainly keeps per layer on this rank (module docstring)."""
    m = cfg.model
    tokens = layout.micro_batch * cfg.data.seq_len // layout.cp
    if layout.activation_checkpointing:
        return tokens * m.dim * 2 // layout.tp
    pr = precision_of(cfg, layout)
    lin = 1 if (pr.fp8_activations or pr.fp8_gemm) else 2  # a linear's saved input, per element
    # An RMSNorm: FP8 codes of its input, or its input (>= 2 bytes) and its fp32 normalized x; SwiGLU: FP8
    # codes of gate and up, or gate, up (>= 2 bytes) and silu(gate) (the product's other operand).
    norm, swiglu = (1, 2 * 1) if pr.fp8_activations else (2 + 4, 3 * 2)
    kv_dim = (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)
    attn = norm * m.dim + lin * 2 * m.dim + 2 * (m.dim + 2 * kv_dim)  # norm, q/k/v and o inputs, q k v
    mlp = norm * m.dim + (0 if m.moe_experts else lin * (m.dim + m.ffn_dim) + swiglu * m.ffn_dim)
    return tokens * (attn + mlp) // layout.tp


def layer_weight_copy_bytes(cfg: Config, layout: Layout) -> int:
    """Bytes of the bf16 weight copies one micro-batch's forward keeps per layer on this rank (module docstring):
    autocast's casts of fp32 dense weights, saved by each GEMM for its input gradient; 0 where not certain."""
    m, pr = cfg.model, precision_of(cfg, layout)
    autocast = pr.name == "bf16" or pr.autocast_bf16
    if not autocast or pr.param_dtype == "bf16" or pr.fp8_gemm or pr.fp8_activations:
        return 0
    if layout.activation_checkpointing or cfg.method.name != "dense":
        return 0
    kv_dim = (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)
    attn = 2 * m.dim * m.dim + 2 * m.dim * kv_dim  # q, o; k, v
    mlp = 0 if m.moe_experts else 3 * m.dim * m.ffn_dim
    return 2 * (attn + mlp) // layout.tp


def activation_parts(cfg: Config, layout: Layout) -> Dict[str, int]:
    """{"activations": bytes in flight on rank 0 before a backward, "with_gradients": 1 if a steady backward
    holds them together with every gradient, else 0} (module docstring)."""
    m, v = layout.grad_accum, layout.pp_virtual
    if layout.pp > 1:
        warm = warmup_forwards(layout.pp_schedule, layout.pp, m, 0, v)
        chunks = min(warm + 1, v * m)
    else:
        warm, chunks, v = 0, 1, 1
    layers = cfg.model.n_layers // (layout.pp * v)
    steady = v * m - warm >= (v - 1) * layout.pp + 2
    with_grads = steady and not layout.in_backward and layout.dp_impl != "fssdp"
    per_layer = layer_activation_bytes(cfg, layout) + layer_weight_copy_bytes(cfg, layout)
    return {"activations": chunks * layers * per_layer, "with_gradients": int(with_grads)}


def _floor_terms(cfg: Config, counts: ParamCounts, layout: Layout) -> Dict[str, int]:
    parts = state_floor_parts(cfg, counts, layout)
    act = activation_parts(cfg, layout)
    act_total = act["activations"] + act["with_gradients"] * parts["gradients"]
    return {**parts, "activations": act["activations"], "act_total": act_total}


def state_floor(cfg: Config, counts: ParamCounts, layout: Layout, act_scale: int = 1) -> int:
    """A lower bound on the rank's peak bytes: weights + moments + max(gradients, activations [+ gradients]).
    `act_scale`: the activation term's multiplier, 1 for the bound (the tests show that 2 overshoots)."""
    t = _floor_terms(cfg, counts, layout)
    act = t["act_total"] + (act_scale - 1) * t["activations"]
    return t["weights"] + t["moments"] + max(t["gradients"], act)


def floor_reason(cfg: Config, counts: ParamCounts, layout: Layout, budget: int) -> str:
    t = _floor_terms(cfg, counts, layout)
    floor = t["weights"] + t["moments"] + max(t["gradients"], t["act_total"])  # state_floor, from the same terms
    act = f"activations in flight {t['activations'] / GB:.3g}"
    if t["act_total"] > t["activations"]:
        act += " + gradients"
    return (
        f"OOM by at least {(floor - budget) / GB:.3g} GB: weights {t['weights'] / GB:.3g} + optimizer moments "
        f"{t['moments'] / GB:.3g} + max(gradients {t['gradients'] / GB:.3g}, {act}) GB per rank > budget "
        f"{budget / GB:.3g} GB"
    )


def comm_floor(
    cfg: Config, counts: ParamCounts, layout: Layout, cluster: Cluster, compute_s: float
) -> Dict[str, float]:
    """Seconds of communication every rank of `layout` exposes at least, by group (module docstring)."""
    m = cfg.model
    tokens = layout.micro_batch * cfg.data.seq_len // layout.cp  # one micro-batch of one rank, before tp
    per_rank_layers = m.n_layers // layout.pp
    steps = per_rank_layers * layout.grad_accum  # (layer, micro-batch) pairs of one rank
    deg = layout.degrees
    out: Dict[str, float] = {}

    def secs(group: str, kind: str, nbytes: float) -> float:
        p = group_size(deg, group)
        return nbytes * ring_factor(kind, p) / (link_gbps(cluster, deg, group) * GB)

    if layout.tp > 1:
        act = tokens * m.dim
        if layout.sequence_parallel:
            out["tp"] = secs("tp", "reduce_scatter", 4 * steps * act * 2) + secs("tp", "all_gather", 4 * steps * act)
        else:
            out["tp"] = secs("tp", "all_reduce", 4 * steps * act * 2)
    if layout.cp > 1 and layout.cp_impl == "ulysses":
        out["cp"] = secs("cp", "all_to_all", 4 * steps * tokens * (m.dim // layout.tp) * 2)
    if layout.pp > 1:
        out["pp"] = secs("pp", "p2p_send", layout.grad_accum * tokens * m.dim // layout.tp * 2)
    if layout.dp_impl == "fssdp" and layout.dp * layout.cp > 1:
        out["dp_cp"] = _fssdp_floor(cfg, counts, layout, compute_s, secs)
    return out


def _fssdp_floor(cfg: Config, counts: ParamCounts, layout: Layout, compute_s: float, secs) -> float:
    pr = precision_of(cfg, layout)
    gather_bytes = min({"fp32": 4, "bf16": 2, "fp8": 1}[layout.gather_dtype], _weight_bytes(pr))
    per_rank = counts.block_matrices / (layout.tp * layout.pp)
    passes = 2 if cfg.parallel.fssdp_reshard_after_forward else 1
    t_gather = secs("dp_cp", "all_gather", passes * layout.grad_accum * per_rank * gather_bytes)
    t_reduce = secs("dp_cp", "reduce_scatter", per_rank * 2)
    pieces = 2 * (cfg.model.n_layers // layout.pp) * layout.grad_accum
    return sum(max(t - compute_s, t / pieces) for t in (t_gather, t_reduce))


def step_bound(
    cfg: Config, flops: FlopCounter, counts: ParamCounts, layout: Layout, cluster: Cluster, efficiency: float
) -> float:
    """A lower bound on cost.step_cost's step time: compute + bubble + the communication floor."""
    compute_s = compute_time(cfg, flops, layout, cluster, efficiency)[0]
    return compute_s * (1 + bubble(layout, compute_s)) + sum(
        comm_floor(cfg, counts, layout, cluster, compute_s).values()
    )
