"""Model shapes, parameter counts, attention backends, RoPE, RMSNorm and causality."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megaeff.config.schema import MethodConfig, ModelConfig
from megaeff.errors import ConfigError
from megaeff.layers.attention import MathAttention, SdpaAttention, select_attention
from megaeff.layers.norm import RMSNorm
from megaeff.layers.rope import apply_rope, rope_tables
from megaeff.models.init import materialize
from megaeff.models.llama import build_llama, count_params

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Full-rank parameter counts of the GaLore / SLTrain benchmark shapes (untied embedding and head).
EXPECTED_PARAMS = {
    "llama_60m": (58_073_600, "58.07M"),
    "llama_130m": (134_105_856, "134.11M"),
    "llama_350m": (367_969_280, "367.97M"),
    "llama_1b": (1_339_082_752, "1339.08M"),
    "llama_7b": (6_738_415_616, "6738.4M"),
}


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(name="t", dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=50, max_seq_len=64)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **overrides):
    cfg = tiny_cfg(**overrides)
    model = build_llama(cfg, MethodConfig(), device="meta")
    return materialize(model, torch.device("cpu"), seed, cfg.init_std)


def expected_count(m: ModelConfig) -> int:
    kv = m.n_kv_heads or m.n_heads
    head_dim = m.dim // m.n_heads
    attn = 2 * m.dim * m.dim + 2 * m.dim * kv * head_dim
    mlp = 3 * m.dim * m.ffn_dim
    per_layer = attn + mlp + 2 * m.dim
    return 2 * m.vocab_size * m.dim + m.n_layers * per_layer + m.dim


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("flavor", sorted(EXPECTED_PARAMS))
def test_benchmark_param_counts_on_meta(flavor, compose_cfg):
    cfg = compose_cfg([f"model={flavor}"])
    assert cfg.model.name == flavor
    model = build_llama(cfg.model, MethodConfig(), device="meta")
    n = count_params(model)
    expected, rounded = EXPECTED_PARAMS[flavor]
    assert n == expected
    assert n == expected_count(cfg.model)
    decimals = 1 if flavor == "llama_7b" else 2
    assert f"{n / 1e6:.{decimals}f}M" == rounded
    # Nothing was allocated on a real device.
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_every_model_flavor_counts_match_formula(compose_cfg):
    flavors = sorted(p.stem for p in CONF_DIR.glob("model/*.yaml"))
    assert set(EXPECTED_PARAMS) <= set(flavors)
    for flavor in flavors:
        cfg = compose_cfg([f"model={flavor}"])
        model = build_llama(cfg.model, MethodConfig(), device="meta")
        assert count_params(model) == expected_count(cfg.model), flavor
        assert all(p.is_meta for p in model.parameters())


def test_gqa_reduces_kv_params_only():
    mha = build_llama(tiny_cfg(), MethodConfig(), device="meta")
    gqa = build_llama(tiny_cfg(n_kv_heads=2), MethodConfig(), device="meta")
    assert gqa.layers[0].attention.k.weight.shape == (16, 32)
    assert gqa.layers[0].attention.v.weight.shape == (16, 32)
    assert gqa.layers[0].attention.q.weight.shape == (32, 32)
    assert count_params(mha) - count_params(gqa) == 2 * 2 * (32 * 32 - 16 * 32)


# ----------------------------------------------------------------------------- forward shapes
@pytest.mark.parametrize("n_kv_heads", [None, 4, 2, 1])
def test_forward_shape(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 50, (3, 11))
    logits = model(tokens)
    assert logits.shape == (3, 11, 50)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_forward_explicit_positions_match_default():
    model = tiny_model(n_kv_heads=2)
    tokens = torch.randint(0, 50, (2, 9))
    a = model(tokens)
    b = model(tokens, positions=torch.arange(9))
    c = model(tokens, positions=torch.arange(9).expand(2, 9))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_gqa_equals_mha_with_repeated_kv_weights():
    """A GQA model whose kv projections are repeated per group computes exactly what the MHA model does."""
    gqa = tiny_model(seed=3, n_kv_heads=2).double()
    mha = tiny_model(seed=3).double()
    head_dim = 8
    with torch.no_grad():
        mha.load_state_dict(
            {k: v for k, v in gqa.state_dict().items() if not k.endswith((".k.weight", ".v.weight"))}, strict=False
        )
        for lg, lm in zip(gqa.layers, mha.layers):
            for proj in ("k", "v"):
                w = getattr(lg.attention, proj).weight.view(2, head_dim, 32)
                getattr(lm.attention, proj).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
    tokens = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(gqa(tokens), mha(tokens))


# ----------------------------------------------------------------------------- attention backends
def reference_attention(q, k, v, causal):
    """Plain float64 attention with bottom-right causal alignment."""
    H, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        T, S = q.shape[2], k.shape[2]
        i = torch.arange(T).unsqueeze(1)
        j = torch.arange(S).unsqueeze(0)
        scores = scores.masked_fill(j > i + (S - T), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


ATTN_CASES = [
    (H, Hkv, T, S, causal)
    for H, Hkv in [(4, 4), (4, 2), (4, 1)]
    for T, S in [(6, 6), (3, 8)]
    for causal in (True, False)
]


@pytest.mark.parametrize("H,Hkv,T,S,causal", ATTN_CASES)
def test_sdpa_and_math_attention_agree(H, Hkv, T, S, causal):
    g = torch.Generator().manual_seed(H * 100 + Hkv * 10 + T + S)
    q = torch.randn(2, H, T, 8, dtype=torch.float64, generator=g)
    k = torch.randn(2, Hkv, S, 8, dtype=torch.float64, generator=g)
    v = torch.randn(2, Hkv, S, 8, dtype=torch.float64, generator=g)
    sdpa = SdpaAttention()(q, k, v, causal=causal)
    math_out, lse = MathAttention().forward_with_lse(q, k, v, causal=causal)
    ref_out, ref_lse = reference_attention(q, k, v, causal)
    assert sdpa.shape == math_out.shape == (2, H, T, 8)
    # MathAttention accumulates in at least fp32: float64 inputs stay float64, so both are exact here.
    assert lse.shape == (2, H, T) and lse.dtype == torch.float64
    torch.testing.assert_close(sdpa, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(math_out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(math_out, sdpa, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    # The math backend's __call__ is forward_with_lse's output.
    torch.testing.assert_close(MathAttention()(q, k, v, causal=causal), math_out, rtol=0, atol=0)


def test_math_lse_is_logsumexp_of_scaled_masked_scores():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 4, 16, generator=g)
    k = torch.randn(1, 2, 6, 16, generator=g)
    v = torch.randn(1, 2, 6, 16, generator=g)
    _, lse = MathAttention().forward_with_lse(q, k, v, causal=True)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(16))
    mask = torch.ones(4, 6, dtype=torch.bool).tril(diagonal=2)  # query i sees keys j <= i + 2
    expected = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, expected)
    # First query row sees exactly keys 0..2.
    torch.testing.assert_close(lse[..., 0], torch.logsumexp(scores[..., 0, :3], dim=-1))
    # Non-causal: every key counts.
    _, lse_full = MathAttention().forward_with_lse(q, k, v, causal=False)
    torch.testing.assert_close(lse_full, torch.logsumexp(scores, dim=-1))


def test_sdpa_forward_with_lse_matches_math():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    out_s, lse_s = SdpaAttention().forward_with_lse(q, k, v)
    out_m, lse_m = MathAttention().forward_with_lse(q, k, v)
    torch.testing.assert_close(out_s, out_m)
    torch.testing.assert_close(lse_s, lse_m)


def test_select_attention():
    cpu = torch.device("cpu")
    assert isinstance(select_attention("auto", cpu), SdpaAttention)
    assert isinstance(select_attention("sdpa", cpu), SdpaAttention)
    assert isinstance(select_attention("math", cpu), MathAttention)
    with pytest.raises(ConfigError) as exc:
        select_attention("flash", cpu)
    assert exc.value.field == "model.attention_backend"
    assert "model.attention_backend" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        select_attention("xformers", cpu)
    assert exc.value.field == "model.attention_backend"


# ----------------------------------------------------------------------------- RoPE
def test_rope_preserves_pair_norms():
    D, T = 16, 10
    cos, sin = rope_tables(D, 32, 10000.0)
    assert cos.shape == sin.shape == (32, D)
    x = torch.randn(2, 3, T, D)
    y = apply_rope(x, cos, sin)
    half = D // 2
    pair_norm = lambda t: t[..., :half] ** 2 + t[..., half:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # The rotation is not trivial beyond position 0.
    assert not torch.allclose(y[..., 1:, :], x[..., 1:, :])


def test_rope_position_zero_is_identity_and_positions_none_is_arange():
    D, T = 8, 6
    cos, sin = rope_tables(D, 16, 10000.0)
    x = torch.randn(1, 2, T, D)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :], rtol=0, atol=0)
    torch.testing.assert_close(apply_rope(x, cos, sin, torch.arange(T)), y, rtol=0, atol=0)
    torch.testing.assert_close(apply_rope(x, cos, sin, torch.arange(T).expand(1, T)), y, rtol=0, atol=0)
    # Shifted positions: a shard starting at position 3 equals rows 3.. of the full sequence.
    x_long = torch.randn(1, 2, 10, D)
    full = apply_rope(x_long, cos, sin)
    shard = apply_rope(x_long[..., 3:7, :], cos, sin, torch.arange(3, 7))
    torch.testing.assert_close(shard, full[..., 3:7, :])


def test_rope_relative_property():
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    D = 8
    cos, sin = rope_tables(D, 32, 10000.0)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, D, dtype=torch.float64, generator=gen)
    k = torch.randn(1, 1, 1, D, dtype=torch.float64, generator=gen)
    # apply_rope rounds to fp32 (tables and products): each term of the dot product is off by a few fp32 ulps of
    # |q_i k_i|, so the bound is absolute, 1e-6 |q| |k|; a relative one fails when the dot product nears zero. A
    # rotation by absolute position changes the dot product by O(|q| |k|).
    tol = 1e-6 * float(q.norm() * k.norm())

    def dot(m, n):
        qm = apply_rope(q, cos.double(), sin.double(), torch.tensor([m]))
        kn = apply_rope(k, cos.double(), sin.double(), torch.tensor([n]))
        return float((qm * kn).sum())

    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=0, abs=tol)
    assert abs(dot(5, 2) - dot(13, 2)) > 100 * tol
    assert dot(0, 0) == pytest.approx(float((q * k).sum()), rel=0, abs=tol)


# ----------------------------------------------------------------------------- RMSNorm
def test_rmsnorm_matches_formula():
    norm = RMSNorm(12, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 12))
    x = torch.randn(3, 5, 12)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    norm.init_weights()
    assert torch.equal(norm.weight, torch.ones(12))
    # bf16 input: computed in fp32, returned in bf16.
    xb = x.bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    ref = xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, ref.bfloat16())


# ----------------------------------------------------------------------------- causality
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_model_is_causal(n_kv_heads):
    model = tiny_model(seed=5, n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 50
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_model_is_causal_with_math_backend():
    model = tiny_model(seed=6)
    model.attention_backend = MathAttention()
    tokens = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 7) % 50
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(a[:, -1], b[:, -1])
    # And the math backend computes the same function as SDPA.
    model_sdpa = tiny_model(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model_sdpa(tokens), a, rtol=1e-5, atol=1e-5)
