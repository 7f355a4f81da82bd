"""The lowrank, SLTrain and LOST layers: gradients against dense references, both SLTrain compute paths, inits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call

from megaeff.layers.lost import LostLinear, channel_count, lost_decompose
from megaeff.layers.lowrank import LowRankLinear
from megaeff.layers.sltrain import SLTrainLinear
from megaeff.layers.sltrain_ops import index_checksum, path_costs, sample_support, sparse_token_limit
from megaeff.models.init import Initializer, generator_for

F64 = torch.float64


# Tiny shapes: one intra-op thread is faster and steadier on a shared machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def _init(layer, seed=0, name="blk.q"):
    layer.init_weights(name, Initializer(seed, 0.02))
    return layer


def sltrain(m=10, n=12, rank=3, density=0.2, path="auto", seed=0, name="blk.q", random_b=True):
    layer = _init(SLTrainLinear(n, m, rank=rank, alpha=6.0, density=density, path=path, name=name), seed, name)
    if random_b:  # B starts at zero; make it random so that dA is exercised
        with torch.no_grad():
            layer.B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return layer.double()


def sltrain_reference(x, A, B, v, idx, scale, m, n):
    W = (scale * B @ A).reshape(-1).index_put((idx.long(),), v, accumulate=True).reshape(m, n)
    return x @ W.t()


def lost_reference(x, A, B, Ws, idx, gamma, act, m, n):
    h = x @ A.t()
    h = F.silu(h) if act == "silu" else h
    Wfull = torch.zeros(m, n, dtype=x.dtype).index_copy(1, idx.long(), Ws)
    return gamma * (h @ B.t()) + (1 - gamma) * x @ Wfull.t()


def _grads(out, inputs):
    return torch.autograd.grad(out.pow(2).sum() + out.sum(), inputs)


def _inputs(layer, names, T=(2, 5)):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*T, layer.in_features, dtype=F64, generator=g, requires_grad=True)
    params = [getattr(layer, n).detach().clone().requires_grad_(True) for n in names]
    return x, params


# ----------------------------------------------------------------------------------------------- lowrank
def test_lowrank_gradcheck_and_reference():
    layer = _init(LowRankLinear(12, 10, rank=3, name="blk.q")).double()
    x, (A, B) = _inputs(layer, ["A", "B"])
    f = lambda x, A, B: functional_call(layer, {"A": A, "B": B}, (x,))  # noqa: E731
    assert gradcheck(f, (x, A, B))
    y, ref = f(x, A, B), x @ (B @ A).t()
    assert torch.allclose(y, ref, atol=1e-12)
    for g, r in zip(_grads(y, (x, A, B)), _grads(ref, (x, A, B))):
        assert torch.allclose(g, r, atol=1e-11)


def test_lowrank_init_ranges():
    layer = _init(LowRankLinear(64, 48, rank=8, name="blk.up"))
    assert layer.A.abs().max() <= 1 / math.sqrt(64) and layer.A.abs().max() > 0.9 / math.sqrt(64)
    assert layer.B.abs().max() <= 1 / math.sqrt(8) and layer.B.abs().max() > 0.9 / math.sqrt(8)
    expected = torch.empty(8, 64).uniform_(-1 / 8, 1 / 8, generator=generator_for(0, "blk.up.A"))
    assert torch.equal(layer.A.detach(), expected)


# ----------------------------------------------------------------------------------------------- SLTrain
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_sltrain_gradcheck_each_path(path):
    layer = sltrain(path=path)
    x, (A, B, v) = _inputs(layer, ["A", "B", "sparse_values"], T=(1, 3))
    f = lambda x, A, B, v: functional_call(layer, {"A": A, "B": B, "sparse_values": v}, (x,))  # noqa: E731
    assert gradcheck(f, (x, A, B, v))
    y = f(x, A, B, v)
    ref = sltrain_reference(x, A, B, v, layer.sparse_index, layer.scale, 10, 12)
    assert torch.allclose(y, ref, atol=1e-12)
    for g, r in zip(_grads(y, (x, A, B, v)), _grads(ref, (x, A, B, v))):
        assert torch.allclose(g, r, atol=1e-10)


def test_sltrain_paths_agree():
    layer = sltrain(m=24, n=20, rank=4, density=0.1)
    x, params = _inputs(layer, ["A", "B", "sparse_values"], T=(3, 7))
    results = {}
    for path in ("dense", "sparse"):
        layer.path = path
        y = functional_call(layer, dict(zip(["A", "B", "sparse_values"], params)), (x,))
        results[path] = (y, _grads(y, (x, *params)))
    (yd, gd), (ys, gs) = results["dense"], results["sparse"]
    assert torch.allclose(yd, ys, atol=1e-12)
    for a, b in zip(gd, gs):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_sltrain_bf16_autocast_runs_close_to_fp32(path):
    layer = sltrain(m=24, n=20, rank=4, density=0.1, path=path).float()
    x = torch.randn(4, 20, requires_grad=True)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.05)
    y.float().sum().backward()
    assert layer.A.grad.dtype == layer.sparse_values.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32


def test_sltrain_init_is_sparse_only():
    m, n, delta = 40, 30, 0.05
    layer = _init(SLTrainLinear(n, m, rank=4, alpha=8.0, density=delta, name="layers.0.mlp.up"), 5, "layers.0.mlp.up")
    nnz = math.floor(delta * m * n)
    idx = layer.sparse_index
    assert idx.dtype == torch.int32 and idx.numel() == nnz == layer.sparse_values.numel()
    assert torch.all(idx[1:] > idx[:-1]) and int(idx.min()) >= 0 and int(idx.max()) < m * n
    assert torch.count_nonzero(layer.B) == 0
    bound = 1 / math.sqrt(n)
    for t in (layer.A.detach(), layer.sparse_values.detach()):
        assert float(t.abs().max()) <= bound and float(t.abs().max()) > 0.8 * bound
    W = layer.dense_weight().detach()
    S = torch.zeros(m * n).index_put((idx.long(),), layer.sparse_values.detach()).view(m, n)
    assert torch.equal(W, S)  # step 0: W == S exactly
    assert int(torch.count_nonzero(W)) == nnz
    x = torch.randn(3, n)
    assert torch.allclose(layer(x), x @ S.t(), atol=1e-6)


def test_sltrain_support_depends_on_seed_and_name_only():
    def support(seed, name, m=30, n=20):
        return _init(SLTrainLinear(n, m, rank=2, alpha=1.0, density=0.1, name=name), seed, name).sparse_index

    a = support(3, "layers.1.attention.k")
    assert torch.equal(a, support(3, "layers.1.attention.k"))
    assert not torch.equal(a, support(3, "layers.1.attention.v"))
    assert not torch.equal(a, support(4, "layers.1.attention.k"))
    expected = sample_support(600, 60, generator_for(3, "layers.1.attention.k.sparse_index"))
    assert torch.equal(a, expected)
    assert int(index_checksum(a)) != int(index_checksum(support(3, "layers.1.attention.v")))


@pytest.mark.parametrize("numel,nnz", [(40, 4), (12, 6)])  # the sparse (draw + dedup) and the permutation branch
def test_sample_support_is_uniform(numel, nnz):
    counts = torch.zeros(numel)
    trials = 3000
    for t in range(trials):
        s = sample_support(numel, nnz, torch.Generator().manual_seed(t))
        assert s.numel() == nnz and torch.all(s[1:] > s[:-1])
        counts[s.long()] += 1
    expected = trials * nnz / numel
    assert float((counts - expected).abs().max()) < 6 * math.sqrt(expected)


def test_sltrain_path_rule():
    # Both costs are linear in tokens; only densify has a per-call term, so the rule has one crossover.
    limit = sparse_token_limit(512, 512, 128, 7864)
    assert 100 < limit < 10_000
    for tokens in (1, int(limit) - 1, int(limit) + 1, 10 * int(limit)):
        dense, sparse = path_costs(512, 512, 128, 7864, tokens)
        assert (sparse < dense) == (tokens < limit)
    layer = SLTrainLinear(512, 512, rank=128, alpha=32.0, density=0.03, name="q")
    assert layer.select_path(64) == "sparse" and layer.select_path(65536) == "dense"
    assert "sparse below" in layer.describe() and "dense path at 65536" in layer.describe(65536)
    layer.path = "sparse"
    assert layer.select_path(65536) == "sparse" and "sparse path" in layer.describe()
    # Without enough sparsity advantage (tiny rank, tiny density) sparse wins at any batch.
    assert math.isinf(sparse_token_limit(512, 512, 1, 1))


# ----------------------------------------------------------------------------------------------- LOST
@pytest.mark.parametrize("act", ["none", "silu"])
def test_lost_gradcheck_and_reference(act):
    layer = _init(LostLinear(12, 10, rank=3, channel_ratio=0.25, gamma=0.3, act=act, name="blk.q")).double()
    x, (A, B, Ws) = _inputs(layer, ["A", "B", "sparse_weight"])
    f = lambda x, A, B, Ws: functional_call(layer, {"A": A, "B": B, "sparse_weight": Ws}, (x,))  # noqa: E731
    assert gradcheck(f, (x, A, B, Ws))
    y = f(x, A, B, Ws)
    ref = lost_reference(x, A, B, Ws, layer.channel_index, 0.3, act, 10, 12)
    assert torch.allclose(y, ref, atol=1e-12)
    for g, r in zip(_grads(y, (x, A, B, Ws)), _grads(ref, (x, A, B, Ws))):
        assert torch.allclose(g, r, atol=1e-10)


def test_lost_init_reconstructs_w0_and_selects_channels():
    m, n, r = 24, 40, 6
    layer = _init(LostLinear(n, m, rank=r, channel_ratio=0.1, name="layers.0.attention.o"), 11, "layers.0.attention.o")
    W0 = torch.empty(m, n).normal_(0.0, 0.02, generator=generator_for(11, "layers.0.attention.o.weight"))
    d = lost_decompose(W0, r, channel_count(n, 0.1))
    assert torch.allclose(d.B @ d.A + d.complement, W0.double(), atol=1e-13)  # factors + complement = W0
    assert torch.linalg.matrix_rank(d.B @ d.A) == r
    assert torch.equal(layer.B.detach(), d.B.float()) and torch.equal(layer.A.detach(), d.A.float())
    k = channel_count(n, 0.1)
    assert k == 4 and layer.channel_index.dtype == torch.int32 and layer.channel_index.numel() == k
    idx = layer.channel_index.long()
    assert torch.all(idx[1:] > idx[:-1])
    scores = d.complement.norm(dim=0)
    assert float(scores[idx].min()) >= float(scores[torch.ones(n, dtype=torch.bool).index_fill(0, idx, False)].max())
    assert torch.equal(layer.sparse_weight.detach(), W0[:, idx])
    # Singular vectors have canonical signs: the largest-magnitude entry of each column of B is positive.
    assert torch.all(d.B.gather(0, d.B.abs().argmax(0, keepdim=True)) > 0)


def test_lost_complement_rank_and_sparse_init_options():
    W0 = torch.randn(20, 30, generator=torch.Generator().manual_seed(2)) * 0.02
    d_all = lost_decompose(W0, 4, 3)
    d_two = lost_decompose(W0, 4, 3, complement_rank=2, sparse_init="complement")
    assert torch.linalg.matrix_rank(d_two.complement) == 2
    assert torch.linalg.matrix_rank(d_all.complement) == 16
    assert torch.allclose(d_two.sparse, d_two.complement[:, d_two.channels].float())
    assert torch.equal(d_two.A, d_all.A)
    assert channel_count(30, 0.001) == 1  # at least one channel


def test_lost_gamma_and_activation_formula():
    layer = _init(LostLinear(16, 8, rank=2, channel_ratio=0.25, gamma=1.0, act="none", name="x"))
    x = torch.randn(5, 16)
    # gamma = 1 and f = none: SVD-initialized low-rank, i.e. x (B A)^T with B A the rank-2 truncation of W0.
    assert torch.allclose(layer(x), x @ (layer.B @ layer.A).t(), atol=1e-6)
    layer.gamma = 0.0
    assert torch.allclose(layer(x), x[:, layer.channel_index.long()] @ layer.sparse_weight.t(), atol=1e-6)
