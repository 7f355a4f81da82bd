"""COAT FP8 activations: quantizers, the autograd Functions, the FP8 GEMM wrapper, saved-bytes accounting and
whole tiny LLaMAs of every linear method.

Tolerances. Round-to-nearest into a format with p mantissa bits errs by at most half a step: |Q(x) - x| <=
u |x| in the normal range, u = 2^-(p+1) (E4M3: step 2^-3, u = 2^-4; E5M2: step 2^-2, u = 2^-3), and by at most
half the smallest subnormal times the scale below it (E4M3 2^-10 s, E5M2 2^-17 s). With e(x) = u|x| + d s this
gives *elementwise* bounds for every backward formula by propagating through products: Q(a)Q(b) - ab =
(Q(a) - a) Q(b) + a (Q(b) - b), so |.| <= e(a) (|b| + e(b)) + |a| e(b), summed with absolute values inside
matmuls; silu' and silu'' are bounded by 1.1 and 0.5. These are worst cases (all rounding errors aligned), so
they never fail on a correct implementation and do fail when a gradient uses the wrong scale, format or formula.
A relative slack of 2^-16 covers the FP32 arithmetic itself (reordered sums, the scale multiplications).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from megaeff.config.schema import MethodConfig, ModelConfig, PrecisionConfig
from megaeff.errors import ConfigError
from megaeff.layers.ops import HIGH_PRECISION
from megaeff.models.init import materialize
from megaeff.models.llama import build_llama
from megaeff.precision.act_quant import (
    E4M3,
    E5M2,
    dequantize_groups,
    dequantize_tensor,
    quantize_groups,
    quantize_tensor,
    tensor_scale,
)
from megaeff.precision.fp8 import to_fp8
from megaeff.precision.fp8_activations import (
    Fp8Activations,
    Fp8GemmFallback,
    Fp8GemmLinear,
    Fp8RMSNorm,
    Fp8SavedLinear,
    Fp8SiLU,
    Fp8SwiGLU,
    activation_ops,
)
from megaeff.precision.saved_bytes import SavedBytes
from megaeff.precision.scaled_mm import Fp8GemmError, scaled_mm

pytestmark = pytest.mark.usefixtures("single_thread")

G = 16
U = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}  # half a mantissa step, relative
D = {"e4m3": 2.0**-10, "e5m2": 2.0**-17}  # half the smallest subnormal, in units of the scale
SLACK = 2.0**-16


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def err_tensor(x, fmt):
    """Elementwise bound on |Q(x) - x| for per-tensor quantization."""
    return U[fmt.name] * x.abs() + D[fmt.name] * tensor_scale(x, fmt)


def err_groups(x, fmt, group=G):
    scales = quantize_groups(x, fmt, group).scales.float().repeat_interleave(group, -1)[..., : x.shape[-1]]
    return U[fmt.name] * x.abs() + D[fmt.name] * scales


def assert_within(got, ref, bound):
    excess = (got - ref).abs() - (bound + SLACK * (bound + ref.abs()) + 1e-30)
    assert excess.max() <= 0, f"exceeds the bound by {excess.max().item():.3g} (bound max {bound.max().item():.3g})"


def rows(t):
    return t.reshape(-1, t.shape[-1])


# ---------------------------------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_per_tensor_round_trip_bound(fmt):
    # Spread over 8 decades, so both the normal range and the subnormal floor are exercised.
    x = randn(64, 48) * torch.logspace(-6, 2, 48)
    q = quantize_tensor(x, fmt)
    assert q.codes.dtype == fmt.dtype and q.scale.dtype == torch.float32 and q.scale.dim() == 0
    assert q.scale.item() == pytest.approx(x.abs().max().item() / fmt.max, rel=1e-7)
    assert q.codes.float().abs().max().item() == fmt.max  # the largest element maps to the format's max
    assert_within(dequantize_tensor(q), x, err_tensor(x, fmt))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("cols", [64, 40])  # 40: a ragged last group
def test_per_group_round_trip_bound(fmt, cols):
    x = randn(3, 5, cols) * torch.logspace(-4, 3, cols)
    q = quantize_groups(x, fmt, G)
    assert q.codes.shape == x.shape and q.scales.shape == (3, 5, -(-cols // G))
    assert q.scales.dtype == torch.bfloat16
    assert_within(dequantize_groups(q, G), x, err_groups(x, fmt))


def test_group_scales_are_rounded_to_bf16_before_dividing():
    x = randn(4, 32, seed=3)
    q = quantize_groups(x, E4M3, G)
    amax = x.view(4, 2, G).abs().amax(-1)
    assert not torch.equal((amax / E4M3.max).to(torch.bfloat16).float(), amax / E4M3.max)  # the rounding matters here
    # The codes are exactly x divided by the stored (BF16) scale: dequantization uses the divisor the codes saw.
    divisor = q.scales.float().repeat_interleave(G, -1)
    assert torch.equal(q.codes, to_fp8(x / divisor, E4M3))
    assert torch.equal(dequantize_groups(q, G), q.codes.float() * divisor)


def test_zeros_quantize_to_zero_with_finite_scales():
    z = torch.zeros(4, 32)
    for fmt in (E4M3, E5M2):
        q = quantize_tensor(z, fmt)
        assert q.scale.item() == 1.0 and torch.equal(dequantize_tensor(q), z)
    x = torch.cat([torch.zeros(4, 16), randn(4, 16)], -1)  # one zero group beside a normal one
    q = quantize_groups(x, E4M3, G)
    assert torch.isfinite(q.scales.float()).all() and (q.scales.float() > 0).all()
    assert torch.equal(dequantize_groups(q, G)[:, :16], torch.zeros(4, 16))


# ---------------------------------------------------------------------------------------------------- Functions
def _grads(fn, inputs, dy):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, dy)


def test_linear_saves_fp8_and_bounds_gradients():
    x, w = randn(2, 32, 64, seed=1), randn(48, 64, seed=2, scale=0.05)
    dy = randn(2, 32, 48, seed=3)
    y_ref, (dx_ref, dw_ref) = _grads(F.linear, (x, w), dy)
    y, (dx, dw) = _grads(Fp8SavedLinear.apply, (x, w), dy)
    assert torch.equal(y, y_ref)  # the forward is the high-precision op
    e_dy, e_x = err_tensor(dy, E5M2), err_tensor(x, E4M3)
    assert_within(dx, dx_ref, e_dy @ w.abs())  # dX = Q5(dY) W, the weight exact
    assert_within(dw, dw_ref, rows(e_dy).t() @ (rows(x).abs() + rows(e_x)) + rows(dy).abs().t() @ rows(e_x))


def test_gemm_linear_bounds_forward_and_gradients():
    x, w = randn(2, 32, 64, seed=1), randn(48, 64, seed=2, scale=0.05)
    dy = randn(2, 32, 48, seed=3)
    y_ref, (dx_ref, dw_ref) = _grads(F.linear, (x, w), dy)
    policy = Fp8Activations(G, gemm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Fp8GemmFallback)  # every GEMM here meets the rules
        y, (dx, dw) = _grads(lambda a, b: Fp8GemmLinear.apply(a, b, policy), (x, w), dy)
    e_x, e_w, e_dy = err_tensor(x, E4M3), err_tensor(w, E4M3), err_tensor(dy, E5M2)
    assert_within(y, y_ref, e_x @ (w.abs() + e_w).t() + x.abs() @ e_w.t())
    assert_within(dx, dx_ref, e_dy @ (w.abs() + e_w) + dy.abs() @ e_w)
    assert_within(dw, dw_ref, rows(e_dy).t() @ (rows(x).abs() + rows(e_x)) + rows(dy).abs().t() @ rows(e_x))


def test_gemm_fallback_is_reported_once_and_stays_correct():
    x, w = randn(2, 8, 40, seed=1), randn(24, 40, seed=2, scale=0.05)  # K = 40 and N = 24: not multiples of 16
    policy = Fp8Activations(G, gemm=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            y = Fp8GemmLinear.apply(x, w, policy)
    reasons = [str(c.message) for c in caught if issubclass(c.category, Fp8GemmFallback)]
    assert len(reasons) == 1 and "K = 40 is not a multiple of 16" in reasons[0]
    e_x, e_w = err_tensor(x, E4M3), err_tensor(w, E4M3)
    assert_within(y, F.linear(x, w), e_x @ (w.abs() + e_w).t() + x.abs() @ e_w.t())


def test_rmsnorm_saves_groups_and_rstd_and_bounds_gradients():
    x, w = randn(2, 32, 64, seed=4) * 3.0, 1.0 + randn(64, seed=5, scale=0.1)
    dy, eps = randn(2, 32, 64, seed=6), 1e-6
    y_ref, (dx_ref, dw_ref) = _grads(lambda a, b: HIGH_PRECISION.rmsnorm(a, b, eps), (x, w), dy)
    y, (dx, dw) = _grads(lambda a, b: Fp8RMSNorm.apply(a, b, eps, G), (x, w), dy)
    assert torch.equal(y, y_ref)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xhat, e = x * rstd, err_groups(x, E4M3) * rstd  # x_hat is recomputed from the FP8 x and the exact rstd
    gw = dy * w
    m = (gw * xhat).mean(-1, keepdim=True)
    dm = (gw.abs() * e).mean(-1, keepdim=True)
    assert_within(dx, dx_ref, rstd * (e * m.abs() + (xhat.abs() + e) * dm))
    assert_within(dw, dw_ref, rows(dy.abs() * e).sum(0))


def test_swiglu_saves_gate_and_up_and_bounds_gradients():
    gate, up, dy = randn(2, 32, 48, seed=7) * 2, randn(2, 32, 48, seed=8), randn(2, 32, 48, seed=9)
    out_ref, (dg_ref, du_ref) = _grads(lambda g, u: F.silu(g) * u, (gate, up), dy)
    out, (dg, du) = _grads(lambda g, u: Fp8SwiGLU.apply(g, u, G), (gate, up), dy)
    assert torch.equal(out, out_ref)
    e_g, e_u = err_groups(gate, E4M3), err_groups(up, E4M3)
    assert_within(du, du_ref, dy.abs() * 1.1 * e_g)  # |silu'| <= 1.1
    assert_within(dg, dg_ref, dy.abs() * (1.1 * e_u + (up.abs() + e_u) * 0.5 * e_g))  # |silu''| <= 0.5


def test_silu_saves_groups_and_bounds_gradient():
    x, dy = randn(64, 40, seed=10) * 2, randn(64, 40, seed=11)  # 40: a ragged group (LOST's rank need not be 16k)
    y_ref, (dx_ref,) = _grads(F.silu, (x,), dy)
    y, (dx,) = _grads(lambda a: Fp8SiLU.apply(a, G), (x,), dy)
    assert torch.equal(y, y_ref)
    assert_within(dx, dx_ref, dy.abs() * 0.5 * err_groups(x, E4M3))


def test_saved_tensors_are_fp8_and_shared_between_consumers():
    w = [torch.nn.Parameter(randn(32, 64, seed=s, scale=0.05)) for s in range(3)]
    x = randn(4, 16, 64).requires_grad_()
    policy = Fp8Activations(G)
    with SavedBytes(w) as fp8:
        h = x * 2.0  # the normed input of q, k and v in the model
        outs = [policy.linear(h, wi) for wi in w] + [policy.linear(h.reshape(-1, 64), w[0])]
    with SavedBytes(w) as ref:
        h = x * 2.0
        outs = [F.linear(h, wi) for wi in w]  # noqa: F841 (the graph, and what it saved, stays alive)
    # One E4M3 copy (1 byte per element) plus its FP32 scale for all four consumers; FP32 saves h once too.
    assert fp8.bytes == h.numel() + 4
    assert ref.bytes == 4 * h.numel()


# ---------------------------------------------------------------------------------------------------- scaled_mm
def _fp8_pair(m=32, k=64, n=48, fa=E4M3, fb=E4M3):
    a, b = quantize_tensor(randn(m, k, seed=12), fa), quantize_tensor(randn(n, k, seed=13), fb)
    return a.codes, b.codes.t(), a.scale, b.scale  # B = W^T of a row-major W: column-major


def test_scaled_mm_matches_fp32_reference_of_dequantized_inputs():
    for fa, fb in [(E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2)]:
        a, b, sa, sb = _fp8_pair(fa=fa, fb=fb)
        ref = (a.float() * sa) @ (b.float() * sb)
        # Products of two FP8 values are exact in FP32; both sides are FP32 sums of the same K = 64 terms in
        # possibly different orders, so they differ by at most K * 2^-24 * sum |a_i b_i| (plus the scale products).
        tol = 64 * 2.0**-24 * ((a.float().abs() * sa) @ (b.float().abs() * sb)) + 1e-30
        assert ((scaled_mm(a, b, sa, sb, torch.float32) - ref).abs() <= tol).all()
        # BF16 output: one more rounding, half a BF16 step (2^-9 relative) on top.
        out = scaled_mm(a, b, sa, sb, torch.bfloat16)
        assert out.dtype == torch.bfloat16
        assert ((out.float() - ref).abs() <= 2.0**-8 * ref.abs() + tol).all()


@pytest.mark.parametrize(
    "case, match",
    [
        ("a_col_major", "A must be row-major"),
        ("b_row_major", "B must be column-major"),
        ("k_unaligned", "K = 40 is not a multiple of 16"),
        ("n_unaligned", "N = 40 is not a multiple of 16"),
        ("e5m2_pair", "e5m2 x e5m2"),
        ("out_fp16", "out_dtype must be bfloat16 or float32"),
        ("rowwise_scale", "scale_a must be a per-tensor float32 scale"),
        ("bf16_scale", "scale_b must be a per-tensor float32 scale"),
        ("not_fp8", "operands must be float8"),
    ],
)
def test_scaled_mm_enforces_cuda_rules_on_cpu(case, match):
    a, b, sa, sb = _fp8_pair()
    out = torch.float32
    if case == "a_col_major":
        a = a.t().contiguous().t()
    elif case == "b_row_major":
        b = b.contiguous()
    elif case == "k_unaligned":
        a, b, sa, sb = _fp8_pair(k=40)
    elif case == "n_unaligned":
        a, b, sa, sb = _fp8_pair(n=40)
    elif case == "e5m2_pair":
        a, b, sa, sb = _fp8_pair(fa=E5M2, fb=E5M2)
    elif case == "out_fp16":
        out = torch.float16
    elif case == "rowwise_scale":
        sa = sa.expand(a.shape[0], 1).contiguous()
    elif case == "bf16_scale":
        sb = sb.to(torch.bfloat16)
    elif case == "not_fp8":
        a = a.float()
    with pytest.raises(Fp8GemmError, match=match):
        scaled_mm(a, b, sa, sb, out)


# ---------------------------------------------------------------------------------------------------- accounting
def test_saved_bytes_excludes_parameters_and_counts_storages_once():
    w = torch.nn.Parameter(randn(8, 16))
    x = randn(4, 16).requires_grad_()
    with SavedBytes([w]) as s:
        y = F.linear(x, w)  # saves x and a view of w (W^T)
        z = (y * y).sum()  # noqa: F841 (saves y twice: both operands; kept alive with its graph)
    assert s.bytes == x.numel() * 4 + y.numel() * 4
    with SavedBytes() as s_all:
        F.linear(x, w)
    assert s_all.bytes == (x.numel() + w.numel()) * 4  # nothing excluded: the weight is counted too


def test_activation_ops_from_config():
    assert activation_ops(PrecisionConfig()) is HIGH_PRECISION
    coat = activation_ops(PrecisionConfig(name="coat", fp8_activations=True, fp8_gemm=True, act_group_size=32))
    assert isinstance(coat, Fp8Activations) and coat.group_size == 32 and coat.activations and coat.fp8_gemm
    with pytest.raises(ConfigError, match="precision.act_group_size"):
        activation_ops(PrecisionConfig(name="coat", fp8_activations=True, act_group_size=24))


# ---------------------------------------------------------------------------------------------------- tiny LLaMA
TINY = ModelConfig(name="tiny", dim=128, ffn_dim=352, n_heads=4, n_layers=4, vocab_size=264, max_seq_len=64)
METHODS = {
    "dense": {},
    "lowrank": {},
    "sltrain_dense": {"sltrain_path": "dense"},
    "sltrain_sparse": {"sltrain_path": "sparse"},
    "lost": {},
}


def _step(method, act, autocast=False):
    name = method.split("_")[0]
    model = materialize(
        build_llama(TINY, MethodConfig(name=name, **METHODS[method]), device="meta", act=act),
        torch.device("cpu"),
        0,
        TINY.init_std,
    )
    tokens = torch.randint(0, TINY.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with SavedBytes(model) as saved, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, saved.bytes


def _compare_grads(ref, got, total=0.1):
    """Per parameter: cosine > 0.98 and relative error < 0.2; over the whole gradient: relative error < `total`.

    Each E5M2 rounding has an RMS relative error of about 2^-2 / sqrt(12) / 1.4 ~ 5% (a quarter-step grid,
    uniform rounding, 1.4 the mean mantissa); the gradient of a layer-0 weight passes through ~2 such roundings
    per block below the head (4 blocks), which add in quadrature to ~15%, plus the smaller E4M3 (2.5%) ones of
    the saved inputs. Measured worst parameter: cosine 0.991 (0.986 with FP8 GEMMs), relative 0.12; whole
    gradient 0.07 (0.11 with FP8 GEMMs, whose forward also rounds inputs and weights to E4M3, so the backward
    starts from a slightly different point). E5M2 gradients alone account for most of it (0.019 without)."""
    num = den = 0.0
    for n, g in ref.items():
        if g.norm() == 0:  # SLTrain's A at init (B = 0): exactly zero either way
            assert got[n].norm() == 0, n
            continue
        cos = F.cosine_similarity(g.flatten(), got[n].flatten(), dim=0).item()
        rel = ((got[n] - g).norm() / g.norm()).item()
        assert cos > 0.98 and rel < 0.2, (n, cos, rel)
        num += (got[n] - g).norm().item() ** 2
        den += g.norm().item() ** 2
    assert (num / den) ** 0.5 < total


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tiny_llama_fp8_activations(method):
    loss_ref, grads_ref, bytes_ref = _step(method, None)
    loss, grads, nbytes = _step(method, Fp8Activations(G))
    assert torch.equal(loss, loss_ref)  # every forward op is the high-precision one
    _compare_grads(grads_ref, grads)
    ratio = bytes_ref / nbytes
    print(f"\n{method}: saved activations fp32 {bytes_ref} B, fp8 {nbytes} B, {ratio:.2f}x less")
    # q/k/v after RoPE, SDPA, the head and the loss stay FP32, which caps the ratio well below the 4x (3.6x for
    # 1x16 groups) of the compressed tensors themselves; SLTrain's sparse path also saves its scaled factor s*A,
    # a fixed cost that dominates at 64 tokens. See RATIO_FP32 for the bound.
    assert ratio >= RATIO_SLACK * RATIO_FP32[method], (ratio, RATIO_FP32[method])


# Saved-bytes ratios (FP32 reference / FP8 policy) of the tiny LLaMA, measured. They are byte counts of fixed
# shapes, not numerics, so the only slack needed is for what torch's own high-precision ops (SDPA, the loss) save,
# which may differ between versions: 10%. The broken variants fail by far: the same tensors saved with 2-byte
# codes (BF16 instead of E4M3) give 0.69-0.78x these values (dense 1.83, lost 1.85, lowrank 1.84, sltrain_sparse
# 1.59; the old `ratio > 1.7` let all but the last pass), 4-byte codes 0.43-0.54x, no compression 1.0.
RATIO_FP32 = {"dense": 2.517, "lost": 2.649, "lowrank": 2.586, "sltrain_dense": 2.517, "sltrain_sparse": 2.042}
RATIO_SLACK = 0.9


def test_tiny_llama_fp8_gemm_dense():
    loss_ref, grads_ref, bytes_ref = _step("dense", None)
    loss, grads, nbytes = _step("dense", Fp8Activations(G, gemm=True))
    # The forward GEMMs now see E4M3 inputs and weights: about 2^-4 / sqrt(12) relative noise per projection
    # output, which averages out in the loss (measured 2e-4 relative).
    assert abs(loss.item() - loss_ref.item()) < 1e-2 * loss_ref.item()
    _compare_grads(grads_ref, grads, total=0.15)
    # FP8 GEMMs save the same E4M3 inputs (the E4M3 weight is re-quantized in backward, not saved): 2.517x.
    assert bytes_ref / nbytes >= RATIO_SLACK * RATIO_FP32["dense"], bytes_ref / nbytes


def test_tiny_llama_fp8_activations_under_bf16_autocast():
    loss_ref, _, bytes_ref = _step("dense", None, autocast=True)
    loss, _, nbytes = _step("dense", Fp8Activations(G), autocast=True)
    assert torch.equal(loss, loss_ref)
    # Under BF16 autocast the reference saves 2-byte activations *and* autocast's BF16 copies of the 28 block
    # weights (4 blocks x (4 x 128^2 + 3 x 128 x 352) = 802,816 parameters x 2 B = 1,605,632 B of its 3,665,172);
    # the FP8 Functions save 1-byte codes plus scales and no weight copy (they receive the FP32 parameter, which is
    # not counted). Measured 3,665,172 / 951,636 = 3.851x, bound with the same 10% slack as the FP32 case. Broken
    # variants: codes kept 2 bytes wide (BF16) 2.645x, the BF16 weight copies saved as well 1.43x, no FP8 1.0x.
    ratio = bytes_ref / nbytes
    assert ratio >= RATIO_SLACK * 3.851, ratio
