"""MoE (megaeff/models/moe.py) in one process: routing, exact dispatch, balance loss, every linear method, inside
Llama; and the distributed expert modules on a group of one rank (their plan and layout without gloo)."""

from __future__ import annotations

import pytest
import torch

from megaeff.config.schema import MethodConfig, ModelConfig, PrecisionConfig
from megaeff.distributed.dims import ParallelDims
from megaeff.distributed.expert_parallel.experts import ExpertFSSDP, ExpertParallel
from megaeff.models.init import init_weights, materialize
from megaeff.models.llama import build_llama
from megaeff.models.moe import MoE, moe_aux_loss, moe_loads, route_tokens
from megaeff.precision.fp8_activations import activation_ops

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = ("dense", "lowrank", "sltrain", "lost")
DIM, HIDDEN, E, K = 16, 24, 4, 2


def cfg(**kw) -> ModelConfig:
    base = dict(
        name="t",
        dim=DIM,
        n_layers=2,
        n_heads=2,
        ffn_dim=32,
        vocab_size=40,
        max_seq_len=16,
        moe_experts=E,
        moe_top_k=K,
        moe_ffn_dim=HIDDEN,
    )
    return ModelConfig(**{**base, **kw})


def method(name: str) -> MethodConfig:
    return MethodConfig(name=name, rank=4, lost_channel_ratio=0.25) if name != "dense" else MethodConfig()


def moe(name="dense", dtype=torch.float64, seed=0, act=None, **kw) -> MoE:
    m = MoE(cfg(**kw), method(name), "layers.0.mlp", act)
    init_weights(m, seed, 0.2)
    return m.to(dtype)


def batch(seed=1, b=3, t=5, dtype=torch.float64):
    return torch.randn(b, t, DIM, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def naive(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: out_i = sum_j gate_ij * expert_{e_ij}(x_i)."""
    flat = x.reshape(-1, DIM)
    r = route_tokens(flat, m.router.weight, m.top_k, m.router_override)
    rows = []
    for i in range(flat.shape[0]):
        acc = 0
        for j in range(m.top_k):
            acc = acc + r.gates[i, j] * m.experts[int(r.experts[i, j])](flat[i : i + 1])[0]
        rows.append(acc)
    return torch.stack(rows).view_as(x)


def grads(m):
    return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def test_shapes_topk_and_gates():
    m, x = moe(), batch()
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    flat = x.reshape(-1, DIM)
    r = m.route(flat)
    logits = flat @ m.router.weight.T
    top = torch.topk(logits, K, dim=-1)
    assert torch.equal(r.experts, top.indices)
    # Softmax over the top-k logits equals the full softmax renormalized over the top k.
    full = torch.softmax(logits, -1).gather(1, top.indices)
    torch.testing.assert_close(r.gates, full / full.sum(-1, keepdim=True), rtol=0, atol=1e-15)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(flat.shape[0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert int(m.last_loads.sum()) == flat.shape[0] * K
    assert torch.equal(m.last_loads, torch.bincount(top.indices.reshape(-1), minlength=E))
    assert m.aux_loss is None and moe_aux_loss(m) is None  # coefficient 0 by default
    assert set(moe_loads(m)) == {""}


def test_router_stays_high_precision_for_low_precision_inputs():
    m = moe(dtype=torch.bfloat16)
    r = m.route(batch(dtype=torch.bfloat16).reshape(-1, DIM))
    assert r.gates.dtype == torch.float32 and r.probs.dtype == torch.float32


@pytest.mark.parametrize("override", [False, True])
def test_dispatch_matches_the_per_token_loop(override):
    m_fast, m_slow = moe(), moe()
    if override:
        proj = torch.randn(E, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        m_fast.router_override = m_slow.router_override = lambda f: f @ proj.T
    x1 = batch().requires_grad_()
    x2 = batch().requires_grad_()
    w = batch(seed=9)
    y1, y2 = m_fast(x1), naive(m_slow, x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-13)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-13)
    g1, g2 = grads(m_fast), grads(m_slow)
    assert set(g1) == set(g2)
    # The override replaces the router's logits, so its weight is unused; every expert has a gradient.
    assert ("router.weight" in g1) == (not override) and len(g1) == 3 * E + (not override)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=0, atol=1e-13, msg=n)


def test_unused_expert_gets_exact_zero_gradient_under_fp8_activations():
    act = activation_ops(PrecisionConfig(fp8_activations=True))
    m = moe(dtype=torch.float32, act=act)
    table = torch.tensor([4.0, 3.0, -1.0, -2.0])  # experts 2 and 3 never chosen
    m.router_override = lambda f: table.expand(f.shape[0], E) + 0 * f[:, :E]
    m(batch(dtype=torch.float32)).sum().backward()
    assert m.last_loads.tolist() == [15, 15, 0, 0]
    for n, p in m.named_parameters():
        if n.startswith(("experts.2.", "experts.3.")):
            assert p.grad is not None and not p.grad.any(), n
        elif n.startswith("experts."):
            assert p.grad.abs().sum() > 0, n


def test_balance_loss_value_and_gradient():
    m = moe(moe_aux_loss_coef=0.5)
    x = batch(b=2, t=4)
    m(x)
    flat = x.reshape(-1, DIM)
    probs = torch.softmax(flat @ m.router.weight.T, -1)
    chosen = torch.topk(probs, K, -1).indices.reshape(-1)
    f = torch.bincount(chosen, minlength=E).double() / (flat.shape[0] * K)
    expected = 0.5 * E * (f * probs.mean(0)).sum()
    torch.testing.assert_close(m.aux_loss, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(moe_aux_loss(m), expected, rtol=0, atol=1e-15)
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0  # the balance loss trains the router

    # Hand-checked case: all probabilities equal, so P_e = 1/E, sum_e f_e = 1 and the balance is exactly 1
    # whichever experts the ties pick.
    uniform = moe(moe_aux_loss_coef=1.0)
    uniform.router_override = lambda f: torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=f.dtype).expand(f.shape[0], E)
    uniform(batch(b=1, t=2))
    torch.testing.assert_close(uniform.aux_loss, torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", METHODS)
def test_every_linear_method_builds_and_trains(name):
    m = moe(name, dtype=torch.float32, moe_aux_loss_coef=0.01)
    kinds = {type(x.gate).method for x in m.experts}
    assert kinds == {name}
    assert [x.down.name for x in m.experts] == [f"layers.0.mlp.experts.{e}.down" for e in range(E)]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x, target = batch(dtype=torch.float32), batch(seed=5, dtype=torch.float32)
    loss = ((m(x) - target) ** 2).mean() + m.aux_loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.parameters())
    opt.step()
    changed = [n for n, p in m.named_parameters() if not torch.equal(p, before[n])]
    assert "router.weight" in changed
    assert any(n.startswith("experts.") for n in changed)


def test_init_is_layout_independent():
    a, b = moe("sltrain", seed=3), moe("sltrain", seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.experts[0].gate.sparse_values, a.experts[1].gate.sparse_values)  # keyed by expert name


def test_moe_inside_llama_forward_backward():
    c = cfg(moe_aux_loss_coef=0.01)
    model = materialize(build_llama(c, MethodConfig(), device="meta"), torch.device("cpu"), 0, c.init_std)
    assert all(isinstance(block.mlp, MoE) for block in model.layers)
    names = dict(model.named_parameters())
    assert "layers.1.mlp.experts.3.gate.weight" in names and "layers.0.mlp.router.weight" in names
    tokens = torch.randint(0, c.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.shape == (2, 8, c.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, c.vocab_size), tokens.view(-1))
    aux = moe_aux_loss(model)
    # The sum of every block's balance loss (each checked exactly in test_balance_loss_value_and_gradient); the old
    # `0 < aux < 0.01 E` also passed a sum that left a block out.
    per_block = [block.mlp.aux_loss for block in model.layers]
    assert aux is not None and aux.ndim == 0 and len(per_block) == c.n_layers == 2
    assert all(float(t.detach()) > 0 for t in per_block)
    torch.testing.assert_close(aux, per_block[0].reshape(()) + per_block[1].reshape(()), rtol=0, atol=0)
    (loss + aux).backward()
    assert names["layers.0.mlp.router.weight"].grad.abs().sum() > 0
    assert set(moe_loads(model)) == {"layers.0.mlp", "layers.1.mlp"}
    assert all(int(v.sum()) == 16 * K for v in moe_loads(model).values())
    dense = build_llama(cfg(moe_experts=0), MethodConfig(), device="meta")
    assert type(dense.layers[0].mlp).__name__ == "SwiGLU"


@pytest.mark.parametrize("impl", [ExpertFSSDP, ExpertParallel])
def test_distributed_experts_on_one_rank_equal_moe(impl):
    """A group of one: no communication, but the flat layout, plan, exchange node and logical views run."""
    dims = ParallelDims(1, 1, 1, 1, world_size=1)
    ref, m = moe("sltrain", moe_aux_loss_coef=0.1), moe("sltrain", moe_aux_loss_coef=0.1)
    wrapped = impl(m, dims)
    x1, x2, w = batch().requires_grad_(), batch().requires_grad_(), batch(seed=4)
    y1, y2 = ref(x1), wrapped(x2)
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-12)
    ((y1 * w).sum() + ref.aux_loss).backward()
    ((y2 * w).sum() + wrapped.aux_loss).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(wrapped.router.weight.grad, ref.router.weight.grad, rtol=0, atol=1e-12)
    got = wrapped.gather_logical(wrapped.flat_param().grad)
    want = {f"layers.0.mlp.{n}": p.grad for n, p in ref.named_parameters() if n.startswith("experts.")}
    assert set(got) == set(want) == set(wrapped.logical_names())
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-12, msg=n)
    values = {f"layers.0.mlp.{n}": p for n, p in ref.named_parameters() if n.startswith("experts.")}
    assert torch.equal(wrapped.shard_logical(values), wrapped.flat_param().detach())
    assert {n for n, _ in wrapped.named_parameters()} == {"router.weight", wrapped.flat_param_name}
    assert wrapped.last_stats.rows_per_rank == [x1.shape[0] * x1.shape[1] * K] and wrapped.last_stats.straggler == 1.0
    with torch.no_grad():  # evaluation keeps no graph (and EP's kept-graph path is skipped)
        torch.testing.assert_close(wrapped(x1), ref(x1), rtol=0, atol=1e-12)
