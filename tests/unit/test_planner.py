"""megaeff-plan (megaeff/train/planner/): links, the cost model's pieces on hand-checkable numbers, enumeration
and rejection reasons, the emitted overrides and parallel file (compose + validate), and the depth / micro-batch
extrapolation of the fake-tensor step against a direct `measure_step` (exact bytes: memory and every comm key).
"""

from __future__ import annotations

import shutil

import pytest

from megaeff.config import compose, conf_dir
from megaeff.config.parallel import validate_world
from megaeff.train.memory.fake_step import measure_step
from megaeff.train.planner.bounds import (
    ParamCounts,
    activation_parts,
    comm_floor,
    layer_activation_bytes,
    layer_weight_copy_bytes,
    state_floor,
    state_floor_parts,
)
from megaeff.train.planner.cluster import PRESETS, crosses_node, link_gbps, make_cluster
from megaeff.train.planner.cost import FlopCounter, bubble, compute_time, ring_factor, step_cost
from megaeff.train.planner.enumerate import Layout, Options, apply, enumerate_layouts, refusal
from megaeff.train.planner.measure import Measurer, RankCost, bilinear
from megaeff.train.planner.report import overrides, parallel_yaml
from megaeff.train.planner.search import Candidate, Plan, make_plan, memory_reason

# Small shapes: a fake step costs ~0.1 s per layer and micro-batch here, so the measured tests stay ~5 s.
SMALL = ["model=tiny", "precision=bf16", "model.dim=64", "model.ffn_dim=128", "model.n_heads=2", "data.seq_len=32"]


@pytest.fixture(scope="module")
def small():
    return compose(SMALL + ["model.n_layers=4"])


def test_links_follow_megaeff_rank_order():
    # tp innermost: tp=8 fills a node of 8, so tp stays on NVLink and dp (ranks 0, 8) crosses nodes.
    deg = {"tp": 8, "cp": 1, "dp": 2, "pp": 1}
    assert not crosses_node(deg, "tp", 8) and crosses_node(deg, "dp", 8)
    assert link_gbps(PRESETS["h100_sxm"], deg, "tp") == 450.0 and link_gbps(PRESETS["h100_sxm"], deg, "dp") == 50.0
    # tp=2 x dp=4 = one node: everything intra; pp=2 outermost on 2 nodes of 8 crosses, dp_cp does not.
    assert not crosses_node({"tp": 2, "cp": 1, "dp": 4, "pp": 1}, "dp", 8)
    deg = {"tp": 2, "cp": 2, "dp": 2, "pp": 2}
    assert crosses_node(deg, "pp", 8) and not crosses_node(deg, "dp_cp", 8) and not crosses_node(deg, "tp_cp", 8)
    c = make_cluster("a100_80gb", nodes=4, gpu_mem_gb=40)
    assert (c.world, c.gpu_mem_gb, c.inter_gbps) == (32, 40, 25.0)


def test_ring_factors_and_bubble():
    assert ring_factor("all_reduce", 4) == 1.5 and ring_factor("all_gather", 4) == 0.75
    assert ring_factor("reduce_scatter", 2) == 0.5 and ring_factor("p2p_send", 8) == 1.0
    # The simulator's 1F1B bubble equals (pp - 1) / m; interleaved (pp - 1) / (v m); none without a pipeline.
    assert bubble(Layout(1, 1, 1, 4, 1, 8), 1.0) == pytest.approx(3 / 8)
    assert bubble(Layout(1, 1, 1, 4, 1, 8, pp_schedule="interleaved", pp_virtual=2), 1.0) == pytest.approx(3 / 16)
    assert bubble(Layout(1, 1, 8, 1, 1, 8), 1.0) == 0.0


def test_cost_model_by_hand(small):
    m = small.model
    flops = FlopCounter(small)
    d, f, L, S, V = m.dim, m.ffn_dim, m.n_layers, small.data.seq_len, m.vocab_size
    linear = L * (4 * d * d + 3 * d * f)  # q, k, v, o and SwiGLU's three (dense, n_kv_heads = n_heads)
    assert flops.per_token(S).model == 6 * (linear + d * V) + 12 * L * S * d
    cluster = make_cluster("h100_sxm", nodes=2, peak_tflops=100)  # 16 ranks
    lay = Layout(2, 1, 8, 1, 1, 4, sequence_parallel=True)
    compute_s, recompute_s, attn_s, model_flops = compute_time(small, flops, lay, cluster, 0.5)
    tokens = 1 * 4 * 8 * S
    assert compute_s == pytest.approx(tokens * flops.per_token(S).model / 16 / 50e12) and recompute_s == 0
    # Hand-made measured bytes: tp (exposed, NVLink), dp gradients (crosses nodes: 2 x 8 ranks, overlapped
    # with the last micro-batch's backward except one bucket), a scalar.
    comm = {"tp/all_reduce": 900_000_000, "dp_cp/all_reduce": 2_000_000_000, "dp/all_reduce": 16}
    cost = step_cost(small, flops, lay, cluster, 0.5, [RankCost(0, 1, comm, {}, "optimizer")])
    t_tp = 9e8 * 1.0 / 450e9  # all-reduce over 2: 2 (p - 1) / p = 1
    t_dp = 2e9 * (2 * 7 / 8) / 50e9
    assert (
        cost.comm_s["tp/all_reduce"] == pytest.approx(t_tp)
        and cost.exposed_s["tp/all_reduce"] == cost.comm_s["tp/all_reduce"]
    )
    bwd_one = compute_s * 2 / 3 / 4
    assert cost.exposed_s["dp_cp/all_reduce"] == pytest.approx(max(t_dp - bwd_one, 25e6 * 1.75 / 50e9))
    assert cost.step_s == pytest.approx(compute_s + sum(cost.exposed_s.values()))
    assert cost.mfu == pytest.approx(model_flops / (cost.step_s * 16 * 100e12))


def test_bilinear_is_exact_on_a_bilinear_form():
    f = lambda k, m: 7 + 3 * k + 5 * m + 11 * k * m  # noqa: E731
    pts = {(k, m): f(k, m) for k in (1, 2) for m in (4, 6)}
    assert bilinear(pts, 80, 64) == f(80, 64)
    assert bilinear({(k, 3): f(k, 3) for k in (2, 3)}, 10, 3) == f(10, 3)


def test_enumeration_and_refusals(small):
    valid, rejected = enumerate_layouts(small, 4, 2, 4, Options(min_cp_tokens=16, max_micro_batch=2))
    assert valid and all(refusal(small, lay) is None for lay in valid)
    assert all(lay.tp <= 2 for lay in valid)  # tp within a node of 2
    assert all(lay.tp * lay.cp * lay.dp * lay.pp == 4 for lay in valid)
    assert {(lay.tp, lay.cp, lay.dp, lay.pp) for lay in valid} >= {
        (1, 1, 4, 1),
        (2, 1, 2, 1),
        (1, 2, 2, 1),
        (1, 1, 1, 4),
    }
    assert any(lay.pp_schedule == "interleaved" for lay in valid) and any(lay.dp_impl == "fssdp" for lay in valid)
    reasons = {(g, r) for _, g, r in rejected}
    # megaeff's own refusal, word for word: FSSDP with activation checkpointing.
    assert any(g == "config refusal" and "train.activation_checkpointing" in r and "fssdp" in r for g, r in reasons)
    assert all(not (lay.dp_impl == "fssdp" and lay.activation_checkpointing) for lay in valid)
    # Ulysses needs the 2 heads / tp to divide over cp: refused at tp=2 x cp=2.
    uly = Layout(2, 2, 1, 1, 1, 4, cp_impl="ulysses", cp_sharding="contiguous", sequence_parallel=True)
    assert "ulysses" in refusal(small, uly)


def test_memory_rejections_without_measuring():
    lay = Layout(1, 1, 8, 1, 1, 4)
    twin = Layout(1, 1, 8, 1, 1, 4, in_backward=True)
    assert memory_reason(lay, set(), {}) is None
    assert "without optim.in_backward fits" in memory_reason(twin, {lay}, {})
    assert memory_reason(twin, set(), {}) is None  # measured when its twin did not fit
    ooms = {Layout(1, 1, 8, 1, 1, 1): 2}  # out of memory at micro-batch 2, no activation checkpointing
    assert "micro-batch 2" in memory_reason(Layout(1, 1, 8, 1, 4, 1), set(), ooms)
    assert memory_reason(Layout(1, 1, 8, 1, 1, 4), set(), ooms) is None  # a smaller micro-batch may fit
    assert memory_reason(Layout(1, 1, 8, 1, 2, 2, activation_checkpointing=True), set(), ooms) is None
    ooms_ac = {Layout(1, 1, 8, 1, 1, 1, activation_checkpointing=True): 1}
    assert "with activation checkpointing" in memory_reason(Layout(1, 1, 8, 1, 1, 4), set(), ooms_ac)
    # Out of memory without in_backward says nothing of the layout with it (the switch saves memory).
    assert memory_reason(Layout(1, 1, 8, 1, 4, 1, in_backward=True), set(), ooms) is None


def test_state_floor(small):
    counts = ParamCounts.of(FlopCounter(small))
    n = counts.total

    # fp32 weights, fp32 gradients, two fp32 moments, split over tp=2 and (FSSDP) dp=2; all-reduce replicates
    # over dp. The floor: weights + moments + max(gradients, activations in flight [+ gradients]).
    def by_hand(lay, w, g, m, shards):
        assert state_floor_parts(small, counts, lay) == {
            "weights": n * w // shards,
            "gradients": n * g // shards,
            "moments": n * m // shards,
        }
        act = activation_parts(small, lay)
        in_flight = act["activations"] + act["with_gradients"] * (n * g // shards)
        return n * w // shards + n * m // shards + max(n * g // shards, in_flight)

    for lay, w, g, m, shards in (
        (Layout(2, 1, 2, 1, 1, 1, dp_impl="fssdp", sequence_parallel=True), 4, 4, 8, 4),
        (Layout(2, 1, 2, 1, 1, 1, sequence_parallel=True), 4, 4, 8, 2),
        (Layout(1, 1, 1, 1, 1, 1, precision="bf16_w16"), 2, 2, 8, 1),  # the preset's bf16 weights
        (Layout(1, 1, 1, 1, 1, 1, precision="coat_bf16"), 4, 4, 2, 1),  # COAT's FP8 moments
        (Layout(1, 1, 1, 1, 1, 1, in_backward=True), 4, 0, 8, 1),  # gradients freed as they are made
    ):
        assert state_floor(small, counts, lay) == by_hand(lay, w, g, m, shards), lay.name()
    # Activations per layer and micro-batch, by hand (bounds.py), per token over tp: attention = norm input +
    # normalized x (2 + 4 bytes), q/k/v and o inputs (2 each), q k v (2); MLP = norm (2 + 4), gate/up and down
    # inputs (2), gate, up, silu(gate) (2 each). FP8 activations: codes (1) for all but q k v, no normalized x
    # or silu(gate). With recompute: the block input, dim at 2 bytes.
    d, f, tokens = 64, 128, 2 * 32
    bf16 = (6 * d + 2 * 2 * d + 2 * 3 * d) + (6 * d + 2 * (d + f) + 6 * f)
    assert layer_activation_bytes(small, Layout(1, 1, 1, 1, 2, 1)) == tokens * bf16
    fp8 = Layout(2, 1, 1, 1, 2, 1, sequence_parallel=True, precision="fp8act_w16")
    assert layer_activation_bytes(small, fp8) == tokens * ((d + 2 * d + 2 * 3 * d) + (d + (d + f) + 2 * f)) // 2
    assert layer_activation_bytes(small, Layout(1, 2, 1, 1, 2, 1, activation_checkpointing=True)) == 32 * d * 2
    # In flight on rank 0 (the schedule's warm-up + 1): 1F1B min(pp, m) micro-batches of L/pp layers;
    # interleaved min(2 (pp - 1) + (v - 1) pp + 1, v m) chunks of L/(pp v); none of the pipeline's: 1.
    # Each in-flight layer also keeps autocast's bf16 copies of its fp32 dense weights: 2 bytes x (4 d^2 + 3 d f).
    assert layer_weight_copy_bytes(small, Layout(1, 1, 1, 2, 2, 8)) == 2 * (4 * d * d + 3 * d * f)
    per = layer_activation_bytes(small, Layout(1, 1, 1, 2, 2, 8)) + 2 * (4 * d * d + 3 * d * f)
    assert activation_parts(small, Layout(1, 1, 1, 2, 2, 8)) == {"activations": 2 * 2 * per, "with_gradients": 1}
    inter = Layout(1, 1, 1, 2, 2, 2, pp_schedule="interleaved", pp_virtual=2)
    assert activation_parts(small, inter) == {"activations": 4 * 1 * per, "with_gradients": 0}  # no steady B
    assert activation_parts(small, Layout(1, 1, 1, 1, 2, 1))["activations"] == 4 * per


def test_emitted_overrides_compose_and_validate(small, tmp_path):
    lay = Layout(
        2, 1, 1, 2, 1, 4, pp_schedule="interleaved", pp_virtual=2, sequence_parallel=True, precision="fp8act_w16"
    )
    cluster = make_cluster("h100_sxm", gpus_per_node=4)
    plan = Plan(SMALL + ["model.n_layers=4"], cluster, 4, 0.5, 1, [Candidate(lay, 0.0)], [], [], 1, 0, 0, 0.0)
    cfg = compose(overrides(plan))
    assert validate_world(cfg, 4) == {"tp": 2, "cp": 1, "dp": 1, "pp": 2}
    assert (cfg.parallel.pp_schedule, cfg.parallel.pp_virtual, cfg.train.grad_accum) == ("interleaved", 2, 4)
    # The precision preset's fields override the base's precision=bf16 group: FP8 activations alone, bf16 weights.
    assert cfg.precision == apply(compose(SMALL + ["model.n_layers=4"]), lay).precision
    assert (cfg.precision.name, cfg.precision.fp8_activations, cfg.precision.fp8_gemm) == ("coat", True, False)
    assert cfg.precision.param_dtype == "bf16" and cfg.precision.autocast_bf16
    # The parallel group file composes as `parallel=<name>` from a conf dir that holds it.
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    (conf / "parallel" / f"{lay.name()}.yaml").write_text(parallel_yaml(plan))
    rest = [o for o in lay.overrides() if not o.startswith("parallel.")]
    cfg2 = compose(plan.base + [f"parallel={lay.name()}"] + rest, config_dir=str(conf))
    assert cfg2.parallel == cfg.parallel and cfg2.train == cfg.train


def _direct(cfg, lay, rank):
    """A later step measured directly (one untracked step first): what the Measurer's points stand for."""
    r = measure_step(apply(cfg, lay), rank, warm_steps=1)
    return r.peak_bytes, {k: v for k, v in r.extra["comm_bytes"].items() if v}


def test_a_point_is_a_later_steps_peak_not_the_first_steps():
    # A first step's forward and backward run before its optimizer creates the moments; every later step holds
    # them throughout. The Measurer measures a first step and adds the state to its pre-optimizer phases: equal
    # to the byte to a measured second step, here where the peak is in forward/backward (all-reduce, a pipeline
    # stage, FSSDP, optim.in_backward, whose state appears during the first backward).
    cfg = compose(SMALL + ["model.n_layers=4"])
    measurer = Measurer(cfg)
    layouts = (
        Layout(1, 1, 1, 1, 2, 2),
        Layout(1, 1, 1, 2, 2, 4),
        Layout(1, 1, 2, 2, 2, 4, dp_impl="fssdp", gather_dtype="bf16"),
        Layout(1, 1, 1, 1, 2, 2, in_backward=True),
    )
    for lay in layouts:
        point = measurer.point(lay, cfg.model.n_layers // lay.pp, lay.grad_accum, 0)
        later, _ = _direct(cfg, lay, 0)
        first = measure_step(apply(cfg, lay), 0).peak_bytes
        assert point.peak == later > first, lay.name()  # the first step's peak would understate the run's


def test_depth_extrapolation_equals_direct_measurement():
    # dp=2 all-reduce, 3 layers from 1 and 2: memory and the gradient bytes grow with depth.
    cfg = compose(SMALL + ["model.n_layers=3"])
    lay = Layout(1, 1, 2, 1, 1, 1)
    measurer = Measurer(cfg)
    (rc,) = measurer.rank_costs(lay)
    assert measurer.steps_run == 2
    assert (rc.peak, rc.comm) == _direct(cfg, lay, 0)
    # A wrong extrapolation (proportional to depth from one layer) would not pass.
    one = measurer.cache[next(iter(measurer.cache))]
    assert 3 * one.peak != rc.peak and {k: 3 * v for k, v in one.comm.items()} != rc.comm


def test_micro_batch_extrapolation_equals_direct_measurement():
    # tp=2 with sequence parallelism, 5 micro-batches from 3 and 4: tp's bytes grow with the micro-batches.
    cfg = compose(SMALL + ["model.n_layers=1"])
    lay = Layout(2, 1, 1, 1, 1, 5, sequence_parallel=True)
    measurer = Measurer(cfg)
    (rc,) = measurer.rank_costs(lay)
    assert measurer.steps_run == 2
    assert (rc.peak, rc.comm) == _direct(cfg, lay, 0)


def test_a_refusal_at_build_time_rejects_the_layout_and_the_search_goes_on():
    """COAT's FP8 groups must not straddle tp shards, a check parallelize makes while building the layout (not in
    the config checks): a 32-column shard under tp=2 is refused there, and the plan goes on with the others."""
    base = SMALL + ["model.n_layers=2", "precision=coat_bf16"]
    n = ParamCounts.of(FlopCounter(compose(base))).total
    # 5.5 bytes per parameter: dp2 all-reduce (COAT floor 4 + max(4, 2) = 8 n, 6 n with in_backward) is rejected
    # by its floor, so tp2 (4 n) is tried first, then pp2 (4 n, a larger bound: its bubble of half the compute,
    # more than tp's bytes at NVLink's speed once the peak is 10 TFLOP/s).
    cluster = make_cluster("h100_sxm", gpus_per_node=2, gpu_mem_gb=5.5 * n / 1e9, peak_tflops=10)
    opts = Options(max_micro_batch=1, cp_impls=(), gather_dtypes=())
    # One measurement: a refused build is not counted, so the search measures the next layout after it.
    plan = make_plan(base, cluster, 2, top=1, max_measure=1, headroom=0.0, opts=opts)
    built = [lay for lay, kind, why in plan.rejected if kind == "config refusal" and "must not straddle" in why]
    assert built and all(lay.tp == 2 for lay in built), plan.rejected
    measured = [c.layout for c in plan.feasible] + [lay for lay, g, _ in plan.rejected if g == "out of memory"]
    assert plan.measured == 1 and [lay.pp for lay in measured] == [2]


def test_precision_axis_keeps_refusals(small):
    """`--precision` presets are one more enumerated axis; a preset megaeff refuses is listed with its reason."""
    cfg = compose(SMALL + ["model.n_layers=4", "optim=galore"])
    opts = Options(max_micro_batch=1, cp_impls=(), precisions=("bf16", "bf16_w16"))
    valid, rejected = enumerate_layouts(cfg, 1, 1, 1, opts)
    assert {lay.precision for lay in valid} == {"bf16"}
    refused = [why for lay, _, why in rejected if lay.precision == "bf16_w16"]
    assert refused and all("galore" in why for why in refused)
    assert any(why.startswith("config field 'precision.param_dtype'") for why in refused)


# Branch and bound vs exhaustive, on 2 ranks: tp2 and dp2 (all-reduce or FSSDP), with and without activation
# checkpointing and in_backward, one layer, 2 sequences (cp pruned: 16-token shards; pp left out: its bound term,
# the simulator's bubble, is the cost model's own). The cluster is slow (1 MB/s links, 100 MFLOP/s) so that
# communication and compute are both seen, and the budget sits between the layouts' floors.
BNB = SMALL + ["model.n_layers=1"]
BNB_OPTS = Options(max_micro_batch=1, gather_dtypes=("bf16",), max_pp=1)


def test_branch_and_bound_equals_exhaustive_and_its_bounds_hold():
    cfg = compose(BNB)
    counts = ParamCounts.of(FlopCounter(cfg))
    # 15 bytes per parameter: under the all-reduce layouts' floor (fp32 weights + moments + gradients, 16 n), over
    # tp2's measured peaks (13.3 n, 14.0 n), under FSSDP's (19.5 n).
    cluster = make_cluster(
        None, gpus_per_node=2, gpu_mem_gb=15 * counts.total / 1e9, intra_gbps=1e-2, inter_gbps=1e-2, peak_tflops=1e-4
    )
    measurer = Measurer(cfg)
    rows = lambda plan: [(c.layout.name(), c.cost.step_s) for c in plan.top]  # noqa: E731
    for top in (1, 2):  # the second exhaustive search reuses the first's fake steps (one measurer)
        kw = dict(top=top, headroom=0.0, opts=BNB_OPTS, measurer=measurer)
        full = make_plan(BNB, cluster, 2, exhaustive=True, **kw)
        steps = measurer.steps_run
        pruned = make_plan(BNB, cluster, 2, **kw)
        assert measurer.steps_run == steps  # the pruned search measured nothing the exhaustive one did not
        assert len(full.top) == top and rows(pruned) == rows(full)
        assert pruned.stats["floor"] > 0 and pruned.measured < full.measured
        assert not full.notes and not pruned.notes  # no measurement below its bound
        assert pruned.stats["exact_rows"] == top and pruned.stats["capped"] == 0
    assert make_plan(BNB, cluster, 2, top=1, headroom=0.0, opts=BNB_OPTS, measurer=measurer).stats["bound"] > 0
    assert any("OOM by at least" in why for _, g, why in pruned.rejected if g == "memory floor (not measured)")
    # Every layout the exhaustive search measured (fitting or not): floor <= measured peak (a floor above a
    # peak fails here), and the floor is most of the measured state (a floor of 0 would prune nothing).
    measured = [c.layout for c in full.feasible] + [lay for lay, g, _ in full.rejected if g == "out of memory"]
    assert len(measured) == full.measured and any(lay.in_backward for lay in measured)
    for lay in measured:
        ranks = measurer.rank_costs(lay)  # cached: no new fake step
        floor, peak = state_floor(cfg, counts, lay), max(r.peak for r in ranks)
        state = max(r.state["param_bytes"] + r.state["optimizer_state_bytes"] for r in ranks)
        assert 0.6 * state <= floor <= peak, lay.name()
    assert measurer.steps_run == steps
    # Step bound <= step for every fitting layout, and the communication floor is not zero where tp talks.
    for cand in full.feasible:
        assert cand.bound_s <= cand.cost.step_s, cand.layout.name()
        if cand.layout.tp > 1:
            compute = cand.cost.compute_s * (1 + cand.cost.bubble_fraction)
            assert comm_floor(cfg, counts, cand.layout, cluster, cand.cost.compute_s)["tp"] > 0
            assert cand.bound_s > compute


PIPE = SMALL + ["model.n_layers=4", "data.seq_len=64"]


def test_activation_floor_holds_on_pipelines_and_twice_it_does_not():
    # Pipelines (rank 0 holds several micro-batches) at shapes where activations outweigh the state, so the
    # activation term decides the floor. Floor <= measured peak on each; the same floor with the activation
    # term doubled exceeds the peak of the no-recompute ones (the count is within 2x of what the step keeps:
    # a bound twice too large would prune layouts that fit).
    cfg = compose(PIPE)
    counts = ParamCounts.of(FlopCounter(cfg))
    measurer = Measurer(cfg)
    one_f_one_b = Layout(1, 1, 1, 2, 4, 4)
    inter = Layout(1, 1, 1, 2, 4, 4, pp_schedule="interleaved", pp_virtual=2)
    recompute = Layout(1, 1, 1, 2, 4, 4, activation_checkpointing=True)
    for lay in (one_f_one_b, inter, recompute):
        parts = state_floor_parts(cfg, counts, lay)
        state = parts["weights"] + max(parts["gradients"], parts["moments"])
        # Rank 0 alone (the bound is rank 0's, and the layout's peak is the largest rank's): one direct fake
        # step each (depth and micro-batches within the measured points: no extrapolation).
        depth = cfg.model.n_layers // (lay.pp * lay.pp_virtual)
        floor, peak = state_floor(cfg, counts, lay), measurer.point(lay, depth, lay.grad_accum, 0).peak
        assert activation_parts(cfg, lay)["activations"] > 0 and floor <= peak, lay.name()
        if not lay.activation_checkpointing:
            assert floor > state, lay.name()  # the activation term, not the state, is the floor here
            assert state_floor(cfg, counts, lay, act_scale=2) > peak, lay.name()


# Few tokens per micro-batch and wide layers: the bf16 weight copies each in-flight forward keeps (autocast of
# fp32 weights) outweigh its activations, as at 70B shapes with one sequence per micro-batch.
COPIES = SMALL + ["model.dim=256", "model.ffn_dim=512", "model.n_heads=4", "data.seq_len=16", "model.n_layers=8"]


def test_weight_copy_floor_holds_and_twice_it_does_not():
    cfg = compose(COPIES)
    counts = ParamCounts.of(FlopCounter(cfg))
    measurer = Measurer(cfg)
    inter = dict(pp_schedule="interleaved", pp_virtual=2)
    fssdp = dict(dp_impl="fssdp", gather_dtype="bf16")  # the bf16 gather is unpacked to fp32, then cast again
    layouts = (
        Layout(1, 1, 1, 4, 1, 16, **inter),
        Layout(2, 1, 1, 4, 1, 16, sequence_parallel=True, **inter),
        Layout(1, 1, 2, 4, 1, 16, **inter, **fssdp),
    )
    for lay in layouts:
        copies, act = layer_weight_copy_bytes(cfg, lay), layer_activation_bytes(cfg, lay)
        assert copies > act, lay.name()  # the term this test is about decides the floor
        depth = cfg.model.n_layers // (lay.pp * lay.pp_virtual)
        floor, peak = state_floor(cfg, counts, lay), measurer.point(lay, depth, lay.grad_accum, 0).peak
        parts = state_floor_parts(cfg, counts, lay)
        in_flight = activation_parts(cfg, lay)["activations"]
        without = parts["weights"] + parts["gradients"] + in_flight * act // (act + copies)
        # Without the copies the floor would be under half the peak; with them it is within 2x of it (not under
        # FSSDP, which keeps more per chunk than the floor counts: 0.45x of its peak here).
        assert 2 * without < peak and floor <= peak, lay.name()
        if lay.dp_impl != "fssdp":
            assert peak < state_floor(cfg, counts, lay, act_scale=2), lay.name()
        else:
            assert floor > 0.4 * peak, lay.name()
    # Where no cast happens (bf16 weights) or nothing is saved (recompute), the term is zero.
    assert layer_weight_copy_bytes(cfg, Layout(1, 1, 1, 4, 1, 16, precision="bf16_w16")) == 0
    assert layer_weight_copy_bytes(cfg, Layout(1, 1, 1, 4, 1, 16, activation_checkpointing=True)) == 0
