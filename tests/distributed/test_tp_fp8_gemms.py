"""Tensor parallelism (tp=2, column and row, with and without sequence parallelism) of the compact layers with
COAT FP8 GEMMs: the TP wrappers reach the FP8 GEMMs through the same policy the layer was built with.

FP8 per-tensor scales are taken per shard, so a TP run is not bit-equal to the single process. It is held to the
single-process FP8 bound of tests/unit/test_fp8_factor_gemms.py (see its docstring for the derivation), which
stays valid shard by shard: a shard's amax is at most the tensor's (so its subnormal term is no larger), and a
split inner dimension sums the per-shard bounds into the full one. The one place the TP computation differs in
structure is SLTrain's row-parallel sparse path, which quantizes each rank's partial x_i (sA_i)^T before the
shared B: there the bound is composed from the per-shard terms (`sltrain_row_bounds`).
"""

from __future__ import annotations

import pytest
import torch

from megaeff.distributed.tensor_parallel.layers import parallel_linear
from megaeff.precision.fp8_activations import Fp8Activations
from tests.distributed.harness import pool_fixture
from tests.unit.test_fp8_factor_gemms import (
    METHODS,
    Bnd,
    add,
    assert_within,
    data,
    expected,
    fp8_dw,
    fp8_y,
    make_layer,
    mm,
    rnd,
    scale,
    sparse_dense,
)

pytestmark = pytest.mark.slow

W, T = 64, 32  # width (local shards of 32) and tokens (16 per rank with SP): every GEMM on the FP8 path

pool = pool_fixture(2)


def sltrain_row_bounds(layer, x, dy, p: int) -> dict:
    """y and dB of SLTrain's sparse path, row-parallel: sum_i Q(Q(x_i) Q(sA_i)^T) Q(B)^T + x S^T."""
    X, Dy, Bm = (Bnd(t.detach().double(), torch.zeros_like(t.detach().double())) for t in (x, dy, layer.B))
    As = rnd(scale(Bnd(layer.A.detach().double(), torch.zeros_like(layer.A.detach().double())), layer.scale), 2**-24)
    cols = torch.arange(x.shape[1]).chunk(p)
    hs = [fp8_y(Bnd(X.v[:, c], X.e[:, c]), Bnd(As.v[:, c], As.e[:, c]), 0.0) for c in cols]
    y = mm(X, sparse_dense(layer).T)
    dB = None
    for h in hs:
        y = add(y, fp8_y(h, Bm, 0.0))
        g = fp8_dw(Dy, h, 0.0)
        dB = g if dB is None else add(dB, g)
    return {"y": y, "B": dB}


def _check(dims):
    """Every method x style x SP on this rank: the failures (empty when all hold) and the FP8 GEMM counts."""
    i, p = dims.tp_rank, dims.tp
    out = {}
    for method in METHODS:
        for style in ("column", "row"):
            for sp in (False, True):
                policy = Fp8Activations(16, activations=False, gemm=True)
                logical = make_layer(method, policy, W, W)
                x, dy = data(7, W, W, T)
                bounds = expected(method, logical, x, dy, 0.0)
                if method == "sltrain_sparse" and style == "row":
                    bounds.update(sltrain_row_bounds(logical, x, dy, p))
                tp = parallel_linear(logical, dims, style, sequence_parallel=sp)
                # As tests/distributed/test_tensor_parallel.py: column takes the whole (SP: its tokens') input and
                # gives its output features; row takes its input features and gives the whole (SP: its tokens')
                # output.
                col, row = style == "column", style == "row"
                local = {"dx": (row, col and sp), "y": (col, row and sp)}
                xin = _local(x, *local["dx"], i, p).clone().requires_grad_(True)
                y = tp(xin[None])[0]
                y.backward(_local(dy, *local["y"], i, p))
                got = {"y": y.detach(), "dx": xin.grad, **tp.logical_grads()}
                failures = []
                for name, b in bounds.items():
                    if name in local:
                        b = Bnd(_local(b.v, *local[name], i, p), _local(b.e, *local[name], i, p))
                    try:
                        assert_within(got[name], b, name)
                    except AssertionError as e:
                        failures.append(str(e).splitlines()[0])
                out[(method, style, sp)] = (failures, policy.gemms.counts.fp8, policy.gemms.counts.fallback)
    return out


def _local(t, features: bool, tokens: bool, i: int, p: int):
    """This rank's part of a [tokens, features] tensor: a feature slice and/or a token slice."""
    if features:
        t = t.chunk(p, -1)[i]
    return t.chunk(p, 0)[i] if tokens else t


@pytest.fixture(scope="module")
def results(pool):
    return pool.run(_check, layout=dict(tp=2))


@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
@pytest.mark.parametrize("style", ["column", "row"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_tp2_layer_within_fp8_bounds(results, method, style, sp):
    for rank, res in enumerate(results):
        failures, fp8, fallback = res[(method, style, sp)]
        assert not failures, f"rank {rank}: {failures}"
        assert fp8 > 0 and fallback == 0, (rank, fp8, fallback)
