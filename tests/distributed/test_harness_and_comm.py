"""The multi-rank harness itself (results, failures, hangs) and the autograd collectives of
megaeff/distributed/tensor_parallel/mappings.py with their byte counters, on 4 gloo ranks; ParallelDims' groups
against the rank-order formula."""

from __future__ import annotations

import time

import pytest
import torch

from megaeff.distributed import comm
from megaeff.distributed.tensor_parallel import mappings
from tests.distributed.harness import RankError, RankTimeout, pool_fixture

pytestmark = pytest.mark.slow

pool = pool_fixture(4)


# ----------------------------------------------------------------------------- rank functions
def _coords_and_groups(dims):
    import torch.distributed as dist

    sizes = {
        n: (dist.get_world_size(dims.group(n)) if dims.group(n) is not None else 1)
        for n in ("tp", "cp", "dp", "pp", "dp_cp", "tp_cp")
    }
    ranks = {n: dims.group_ranks(n) for n in ("tp", "dp", "dp_cp")}
    # A real collective over each group: the sum of global ranks in my group.
    sums = {}
    for name in ("tp", "dp", "dp_cp"):
        t = torch.tensor([float(dims.rank)])
        sums[name] = float(comm.all_reduce(t, dims.comm(name))[0])
    return dims.coords(), sizes, ranks, sums, dims.seed_for(7, ("tp",)), dims.seed_for(7)


def _mesh(dims):
    mesh = dims.mesh()
    return mesh.mesh.tolist(), mesh["tp"].mesh.tolist(), mesh["dp"].mesh.tolist()


def _raise_on_rank_two(dims):
    if dims.rank == 2:
        raise KeyError("boom on two")
    return dims.rank


def _rank(dims):
    return dims.rank


def _hang_on_rank_one(dims):
    if dims.rank == 1:
        time.sleep(30)
    return dims.rank


def _collectives(dims):
    """Forward value and backward gradient of each autograd collective, and the bytes each recorded."""
    cg = dims.comm("tp")
    p, r = cg.size, cg.rank
    torch.manual_seed(0)
    full = torch.randn(2, 8, 12, dtype=torch.float64)  # the same on every rank
    mine = full * (r + 1)  # differs per rank
    g = torch.randn(2, 8, 12, dtype=torch.float64)
    out = {}

    def run(name, fn, x, grad):
        x = x.clone().requires_grad_(True)
        dims.comm_stats.reset()
        y = fn(x)
        fwd = dims.comm_stats.snapshot()
        dims.comm_stats.reset()
        y.backward(grad)
        out[name] = (y.detach(), x.grad, fwd, dims.comm_stats.snapshot())

    run("copy", lambda x: mappings.copy_to_region(x, cg), mine, g * (r + 1))
    run("reduce", lambda x: mappings.reduce_from_region(x, cg), mine, g)
    run("gather_seq", lambda x: mappings.gather_seq(x, cg, 1), mine[:, : 8 // p], g * (r + 1))
    run(
        "reduce_scatter_seq", lambda x: mappings.reduce_scatter_seq(x, cg, 1), mine, g[:, r * 8 // p : (r + 1) * 8 // p]
    )
    w = 12 // p
    run("split", lambda x: mappings.split_last(x, cg), full, g[..., r * w : (r + 1) * w])
    run("gather", lambda x: mappings.gather_last(x, cg), mine[..., :w], g)
    return out


# ----------------------------------------------------------------------------- tests
def test_groups_follow_rank_order(pool):
    res = pool.run(_coords_and_groups, layout=dict(tp=2, dp=2))
    for rank, (coords, sizes, ranks, sums, _seed_tp, seed) in enumerate(res):
        assert coords == {"tp": rank % 2, "cp": 0, "dp": rank // 2, "pp": 0}
        assert sizes == {"tp": 2, "cp": 1, "dp": 2, "pp": 1, "dp_cp": 2, "tp_cp": 2}
        assert ranks == {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "dp_cp": [[0, 2], [1, 3]]}
        assert sums["tp"] == sum(r for r in range(4) if r // 2 == rank // 2)
        assert sums["dp"] == sum(r for r in range(4) if r % 2 == rank % 2)
        assert seed == 7
    seeds_tp = [r[4] for r in res]
    assert seeds_tp[0] == seeds_tp[2] != seeds_tp[1] == seeds_tp[3]  # distinct over tp, equal over dp


def test_device_mesh_matches_rank_order(pool):
    res = pool.run(_mesh, layout=dict(tp=2, dp=2))
    assert res[0][0] == [[[[0, 1]], [[2, 3]]]]  # (pp, dp, cp, tp)
    assert [r[1] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r[2] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_rank_error_carries_traceback_and_pool_survives(pool):
    with pytest.raises(RankError, match=r"(?s)rank 2 raised.*KeyError: 'boom on two'"):
        pool.run(_raise_on_rank_two)
    assert pool.run(_rank) == [0, 1, 2, 3]


def test_hang_times_out_and_pool_respawns(pool):
    with pytest.raises(RankTimeout, match=r"ranks \[1\]"):
        pool.run(_hang_on_rank_one, timeout=3)
    res = pool.run(_coords_and_groups, layout=dict(tp=4))
    assert [r[0]["tp"] for r in res] == [0, 1, 2, 3]


@pytest.mark.parametrize("tp", [2, 4])
def test_autograd_collectives_values_grads_and_bytes(pool, tp):
    res = pool.run(_collectives, layout=dict(tp=tp))
    torch.manual_seed(0)
    full = torch.randn(2, 8, 12, dtype=torch.float64)
    g = torch.randn(2, 8, 12, dtype=torch.float64)
    ranks = range(tp)
    total = sum(full * (r + 1) for r in ranks)  # sum of the per-rank tensors
    gsum = sum(g * (r + 1) for r in ranks)
    e, n, w = 8, full.numel(), 12 // tp
    seq = lambda t, r: t[:, r * 8 // tp : (r + 1) * 8 // tp]  # noqa: E731
    for r in ranks:
        out = res[r]
        y, dx, fwd, bwd = out["copy"]
        assert (
            torch.equal(y, full * (r + 1))
            and torch.allclose(dx, gsum)
            and fwd == {}
            and bwd == {"tp/all_reduce": n * e}
        )
        y, dx, fwd, bwd = out["reduce"]
        assert torch.allclose(y, total) and torch.equal(dx, g) and fwd == {"tp/all_reduce": n * e} and bwd == {}
        y, dx, fwd, bwd = out["gather_seq"]
        assert torch.equal(y, torch.cat([full[:, : 8 // tp] * (q + 1) for q in ranks], 1))
        assert torch.allclose(dx, seq(gsum, r))
        assert fwd == {"tp/all_gather": n * e} and bwd == {"tp/reduce_scatter": n * e}
        y, dx, fwd, bwd = out["reduce_scatter_seq"]
        assert torch.allclose(y, seq(total, r)) and torch.equal(dx, g)
        assert fwd == {"tp/reduce_scatter": n * e} and bwd == {"tp/all_gather": n * e}
        y, dx, fwd, bwd = out["gather"]
        assert torch.equal(y, torch.cat([full[..., :w] * (q + 1) for q in ranks], -1))
        assert torch.equal(dx, g[..., r * w : (r + 1) * w]) and fwd == {"tp/all_gather": n * e} and bwd == {}
        y, dx, fwd, bwd = out["split"]
        assert torch.equal(y, full[..., r * w : (r + 1) * w]) and fwd == {}
        assert torch.equal(dx, g) and bwd == {"tp/all_gather": n * e}


def test_bad_split_names_the_dimension(pool):
    with pytest.raises(RankError, match="sequence .* of size 6 is not divisible by the tp degree 4"):
        pool.run(_bad_reduce_scatter, layout=dict(tp=4))


def _bad_reduce_scatter(dims):
    return mappings.reduce_scatter_seq(torch.ones(2, 6, 3), dims.comm("tp"), 1)
