"""Expert FSSDP and fixed expert parallelism (megaeff/distributed/expert_parallel/experts.py) against the
single-process MoE.

The placement and the dispatch table are pure functions, checked here without processes. Then, on 4 gloo ranks
(dp=4, or tp=2 x dp=2: two independent dp groups of 2), every rank builds the same float64 MoE from the seed and
runs the single-process reference on the whole global batch in process, then its own slice through the sharded
module; the test compares outputs, losses (summed over dp), input gradients, router gradients (summed over dp)
and expert gradients gathered to logical tensors, to 1e-10: the math is the same, only the rows each matmul sees
and the order in which a replicated expert's gradients are summed differ. Skewed routing then checks the
straggler measure, and the byte counters record exactly the sparse all-gather and reduce-scatter.
"""

from __future__ import annotations

import random

import pytest
import torch

from megaeff.config.schema import MethodConfig, ModelConfig
from megaeff.distributed.comm import all_reduce
from megaeff.distributed.expert_parallel.experts import IMPLS
from megaeff.distributed.expert_parallel.placement import StepPlan, fixed_placement, plan_placement, replica_rows
from megaeff.models.init import init_weights
from megaeff.models.moe import MoE
from tests.distributed.harness import pool_fixture

pool = pool_fixture(4)
slow = pytest.mark.slow

DIM, HIDDEN, E, K, B, T = 16, 24, 8, 2, 2, 6
TOL = dict(rtol=0, atol=1e-10)
HOT, SKEW = 0, 0.7


# ---------------------------------------------------------------------------------------------------- placement
def check_placement(p, loads, world, slots):
    assert sorted(e for h in p.hosted for e in h) == sorted(e for e, h in enumerate(p.hosts) for _ in h)
    assert all(len(h) >= 1 and len(set(h)) == len(h) for h in p.hosts)  # every expert, never twice on one rank
    assert [len(h) for h in p.hosted] == [slots] * world  # capacity used exactly
    for e, re in enumerate(p.replicas):  # D'Hondt: an expert's last replica went to the largest load per replica
        for f, rf in enumerate(p.replicas):
            if re > 1 and rf < world:
                assert loads[e] * rf >= loads[f] * (re - 1), (loads, p.replicas)


def test_placement_replicas_proportional_to_load():
    loads = [700, 50, 50, 50, 50, 40, 30, 30]
    p = plan_placement(loads, 4, 3)
    assert p == plan_placement(list(loads), 4, 3)  # a pure function: identical on every rank
    assert p.replicas == [4, 2, 1, 1, 1, 1, 1, 1]
    check_placement(p, loads, 4, 3)
    rank_rows = [0] * 4
    for e, hosts in enumerate(p.hosts):
        for j, d in enumerate(hosts):
            rank_rows[d] += replica_rows(loads[e], len(hosts))[j]
    assert sum(rank_rows) == sum(loads) and max(rank_rows) <= 1.1 * sum(loads) / 4
    assert plan_placement([10] * 8, 4, 2).replicas == [1] * 8  # no spare slot: one replica each
    assert fixed_placement(6, 4).hosts == ((0,), (1,), (2,), (3,), (0,), (1,))


def test_placement_never_gets_stuck():
    rng = random.Random(0)
    for _ in range(300):
        world, n = rng.randint(1, 8), rng.randint(1, 12)
        slots = rng.randint(-(-n // world), n)
        loads = [rng.choice([0, 1, 3, 50, 400]) * rng.randint(0, 3) for _ in range(n)]
        check_placement(plan_placement(loads, world, slots), loads, world, slots)


def test_dispatch_table_splits_each_expert_evenly_over_its_replicas():
    counts = [[5, 0, 3], [1, 4, 3], [0, 2, 6]]  # [source][expert]
    placement = plan_placement([6, 6, 12], 3, 2)
    plans = [StepPlan(counts, placement, r, shard=128, param_moves=True) for r in range(3)]
    assert all(p.stats == plans[0].stats for p in plans)
    for s, p in enumerate(plans):
        assert sorted(p.send_perm.tolist()) == list(range(sum(counts[s])))
        assert p.send_splits == [plans[d].recv_splits[s] for d in range(3)]
    for e, hosts in enumerate(placement.hosts):
        got = [plans[d].expert_rows[plans[d].hosted_here.index(e)] for d in hosts]
        assert got == replica_rows(sum(c[e] for c in counts), len(hosts))
    assert plans[0].stats.rows_per_rank == [sum(p.expert_rows) for p in plans]


# ---------------------------------------------------------------------------------------------------- on ranks
def build(method: str, coef: float) -> MoE:
    cfg = ModelConfig(dim=DIM, n_heads=2, moe_experts=E, moe_top_k=K, moe_ffn_dim=HIDDEN, moe_aux_loss_coef=coef)
    m = MoE(cfg, MethodConfig(name=method, rank=4), "layers.0.mlp")
    init_weights(m, 0, 0.2)
    return m.double()


def routing_table(n: int) -> torch.Tensor:
    """Logits that put HOT among the top-2 of exactly SKEW of the tokens, and never of the others."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(n, E, dtype=torch.float64, generator=g)
    logits[:, HOT] = -10.0
    logits[torch.randperm(n, generator=g)[: round(SKEW * n)], HOT] = 10.0
    return logits


def set_router(m: MoE, router: str, rows: slice, n: int) -> None:
    if router == "fixed":
        proj = torch.randn(E, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        m.router_override = lambda f: f @ proj.T
    elif router == "skewed":
        table = routing_table(n)[rows]
        m.router_override = lambda f: table


def _step(dims, impl, method, router, coef, options):
    cg = dims.comm("dp_cp")
    dp, r = cg.size, cg.rank
    g = torch.Generator().manual_seed(3)
    X = torch.randn(dp * B, T, DIM, dtype=torch.float64, generator=g)
    W = torch.randn(dp * B, T, DIM, dtype=torch.float64, generator=g)
    mine, tokens = slice(r * B, (r + 1) * B), slice(r * B * T, (r + 1) * B * T)

    ref = build(method, coef)
    set_router(ref, router, slice(None), dp * B * T)
    xr = X.clone().requires_grad_()
    yr = ref(xr)
    loss_ref = (yr * W).sum() + (ref.aux_loss if coef else 0)
    loss_ref.backward()

    m = build(method, coef)
    set_router(m, router, tokens, dp * B * T)
    layer = IMPLS[impl](m, dims, **options)
    dims.comm_stats.reset()
    x = X[mine].clone().requires_grad_()
    y = layer(x)
    loss = (y * W[mine]).sum() + (layer.aux_loss if coef else 0)
    loss.backward()
    comm = dims.comm_stats.snapshot()
    out = dict(
        y=y.detach(),
        y_ref=yr[mine].detach(),
        xg=x.grad,
        xg_ref=xr.grad[mine],
        loss=float(all_reduce(loss.detach().view(1), cg)),
        loss_ref=float(loss_ref.detach()),
        grads=layer.gather_logical(layer.flat_param().grad),
        grads_ref={f"layers.0.mlp.{n}": p.grad for n, p in ref.named_parameters() if n.startswith("experts.")},
        stats=layer.last_stats,
        comm=comm,
        flat_shape=tuple(layer.flat_param().shape),
        dp=dp,
        dp_rank=r,
    )
    if router == "learned":
        out.update(router_grad=all_reduce(layer.router.weight.grad, cg), router_grad_ref=ref.router.weight.grad)
    if coef:
        out.update(aux=float(all_reduce(layer.aux_loss.detach().view(1), cg)), aux_ref=float(ref.aux_loss))
    return out


def run_step(dims, arg):
    return _step(dims, *arg)


def assert_equivalent(results):
    for res in results:
        torch.testing.assert_close(res["y"], res["y_ref"], **TOL)
        torch.testing.assert_close(res["xg"], res["xg_ref"], **TOL)
        assert res["loss"] == pytest.approx(res["loss_ref"], rel=0, abs=1e-10)
        assert set(res["grads"]) == set(res["grads_ref"])
        for name, ref in res["grads_ref"].items():
            torch.testing.assert_close(res["grads"][name], ref, **TOL, msg=name)
        if "router_grad" in res:
            torch.testing.assert_close(res["router_grad"], res["router_grad_ref"], **TOL)
            assert res["router_grad_ref"].abs().sum() > 0
        if "aux" in res:
            assert res["aux"] == pytest.approx(res["aux_ref"], rel=0, abs=1e-12)
    # One placement: every rank planned the same (under tp=2 x dp=2 both dp groups run the same batch).
    assert all(res["stats"] == results[0]["stats"] for res in results)
    assert sum(results[0]["stats"].rows_per_rank) == results[0]["dp"] * B * T * K


@slow
@pytest.mark.parametrize("impl", ["fssdp", "ep"])
@pytest.mark.parametrize("layout", [dict(dp=4), dict(tp=2, dp=2)], ids=["dp4", "dp2"])
def test_fixed_router_matches_single_process(pool, impl, layout):
    results = pool.run(run_step, (impl, "dense", "fixed", 0.0, {}), layout=layout)
    assert_equivalent(results)
    dp = results[0]["dp"]
    for res in results:
        comm, rank = res["comm"], res["dp_rank"]
        stats = res["stats"]
        token_bytes = 8 * DIM * (B * T * K + stats.rows_per_rank[rank])  # what this rank sends, dispatch + combine
        assert comm["dp_cp/all_to_all"] == 2 * token_bytes  # forward, and the conjugate pair in backward
        assert comm["dp_cp/all_gather"] == 8 * E * dp  # the counts: the plan's only extra collective
        if impl == "fssdp":
            padded = res["flat_shape"][1] * dp
            slots = -(-E // dp) + 1
            assert res["flat_shape"][0] == E
            # Every rank sends its shard of each replica: slots * dp shards; again in backward (re-materialization).
            assert comm["dp_cp/sparse_all_gather"] == 2 * 8 * slots * padded
            assert comm["dp_cp/sparse_reduce_scatter"] == 8 * slots * padded
            assert all(len(h) == slots for h in [[e for e, hs in enumerate(stats.hosts) if d in hs] for d in range(dp)])
            assert stats.param_elems_off_rank == (dp - 1) * slots * padded
        else:
            assert res["flat_shape"][0] == len(range(rank, E, dp))
            assert not any("sparse" in key for key in comm)
            assert stats.hosts == [[e % dp] for e in range(E)] and stats.param_elems_off_rank == 0


@slow
@pytest.mark.parametrize("impl", ["fssdp", "ep"])
def test_learned_router_and_balance_loss_match(pool, impl):
    assert_equivalent(pool.run(run_step, (impl, "dense", "learned", 0.05, {}), layout=dict(dp=4)))


@slow
def test_sltrain_experts_without_rematerialization(pool):
    results = pool.run(
        run_step, ("fssdp", "sltrain", "fixed", 0.0, dict(rematerialize=False, slots_per_rank=4)), layout=dict(dp=4)
    )
    assert_equivalent(results)
    padded = results[0]["flat_shape"][1] * 4
    assert results[0]["comm"]["dp_cp/sparse_all_gather"] == 8 * 4 * padded  # 4 slots, gathered once: kept for backward


@slow
def test_skewed_router_fssdp_balances_what_ep_cannot(pool):
    fssdp = pool.run(run_step, ("fssdp", "dense", "skewed", 0.0, {}), layout=dict(dp=4))
    ep = pool.run(run_step, ("ep", "dense", "skewed", 0.0, {}), layout=dict(dp=4))
    assert_equivalent(fssdp)
    assert_equivalent(ep)
    f, p = fssdp[0]["stats"], ep[0]["stats"]
    assert f.loads == p.loads and f.loads[HOT] == round(SKEW * 4 * B * T)
    assert len(f.hosts[HOT]) == 4  # the hot expert everywhere
    # EP: rank 0 holds the hot expert (35% of all rows) and expert 4; FSSDP spreads it over every rank.
    assert p.rows_per_rank[0] == f.loads[HOT] + f.loads[4] and p.straggler > 1.5
    assert f.straggler < 1.15 and f.straggler < p.straggler
