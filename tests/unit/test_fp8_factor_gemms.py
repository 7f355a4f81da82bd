"""COAT FP8 GEMMs in the compact layers: lowrank, SLTrain (both paths) and LOST under `Fp8Activations(gemm=True)`.

Each layer's forward, input gradient and every parameter gradient are compared with the exact (float64) value of
the same layer, against an elementwise bound DERIVED from the FP8 formats and computed from the operands by
propagating intervals through the layer's computation graph (`Bnd`: the exact value and a bound on how far the
FP8 path may be from it):

- per-tensor quantization of a value known to within e: |Q(a') - a| <= e + u(|a| + e) + d * amax/FMAX, with u half
  a mantissa step, relative (E4M3 2^-4, E5M2 2^-3) and d half the smallest subnormal in units of the scale
  (E4M3 2^-10, E5M2 2^-17): forward operands are E4M3, incoming gradients E5M2;
- a product of perturbed operands: |a'b' - ab| <= e_a (|b| + e_b) + |a| e_b, summed with absolute values inside
  the matmul, plus the FP32 accumulation, K 2^-24 (|a| + e_a)(|b| + e_b) for an inner dimension K;
- silu: |silu'| <= 1.1 and |silu''| <= 0.5; under BF16 autocast every op output is rounded once more (2^-8,
  twice that for silu's backward).

These are worst cases (all rounding errors aligned), so they never fail a correct implementation; a GEMM that
forgets a scale, quantizes the gradient with the wrong scale, or skips a GEMM's quantization of a factor the bound
assumed exact fails them. A high-precision ("no-op FP8") variant would pass an upper bound, so the FP8 path is
checked two more ways: the engine's `_scaled_mm` count (megaeff/precision/fp8_gemm_linear.py, `counts`), and the
forward against an explicit float64 emulation of the FP8 arithmetic, which the high-precision result misses by
orders of magnitude more than the FP32 accumulation the emulation allows.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from megaeff.config.schema import MethodConfig
from megaeff.layers.linear import build_linear
from megaeff.layers.ops import HIGH_PRECISION
from megaeff.models.init import Initializer
from megaeff.precision.act_quant import E4M3, E5M2
from megaeff.precision.fp8_activations import Fp8Activations
from megaeff.precision.fp8_gemm_linear import Fp8Gemm, Fp8GemmFallback

pytestmark = pytest.mark.usefixtures("single_thread")

U = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}
D = {"e4m3": 2.0**-10, "e5m2": 2.0**-17}
EPS32 = 2.0**-24
BF16 = 2.0**-8  # BF16 rounding, relative (8 significant bits)
T, N_IN, N_OUT, R = 32, 64, 48, 16  # tokens, in, out, rank: every GEMM dimension a multiple of 16
METHODS = {
    "lowrank": dict(name="lowrank", rank=R),
    "sltrain_sparse": dict(name="sltrain", rank=R, density=0.1, alpha=8.0, sltrain_path="sparse"),
    "sltrain_dense": dict(name="sltrain", rank=R, density=0.1, alpha=8.0, sltrain_path="dense"),
    "lost": dict(name="lost", rank=R, lost_channel_ratio=0.25),  # 16 channels
}
# FP8 GEMMs per forward + backward: 3 per linear map (y, dx, dW); SLTrain's densify path is one map.
GEMMS = {"lowrank": 6, "sltrain_sparse": 6, "sltrain_dense": 3, "lost": 9}


# ---------------------------------------------------------------------------------------------------- bounds
class Bnd(NamedTuple):
    v: torch.Tensor  # the exact value (float64)
    e: torch.Tensor  # elementwise bound on |FP8 path - v|

    @property
    def mag(self):
        return self.v.abs() + self.e

    @property
    def T(self):
        return Bnd(self.v.t(), self.e.t())


def exact(t):
    t = t.detach().double()
    return Bnd(t, torch.zeros_like(t))


def rnd(b, r):
    """One more rounding of the output with relative unit r (0: none)."""
    return Bnd(b.v, b.e + r * b.mag) if r else b


def q(b, fmt):
    """Per-tensor quantization of a perturbed value."""
    return Bnd(b.v, b.e + U[fmt.name] * b.mag + D[fmt.name] * b.mag.max() / fmt.max)


def mm(a, b, r=0.0):
    k = a.v.shape[-1]
    e = a.e @ b.mag + a.v.abs() @ b.e + k * EPS32 * (a.mag @ b.mag)
    return rnd(Bnd(a.v @ b.v, e), r)


def add(a, b, r=0.0):
    return rnd(Bnd(a.v + b.v, a.e + b.e), r)


def scale(a, c, r=0.0):
    return rnd(Bnd(a.v * c, a.e * abs(c)), r)


def fp8_y(x, w, r):  # y = Q4(x) Q4(w)^T
    return mm(q(x, E4M3), q(w, E4M3).T, r)


def fp8_dx(dy, w, r):  # dx = Q5(dy) Q4(w)
    return mm(q(dy, E5M2), q(w, E4M3), r)


def fp8_dw(dy, x, r):  # dW = Q5(dy)^T Q4(x)
    return mm(q(dy, E5M2).T, q(x, E4M3), r)


def silu(z, r):
    return rnd(Bnd(F.silu(z.v), 1.1 * z.e), r)


def silu_back(dh, z, r):
    s = torch.sigmoid(z.v)
    return rnd(Bnd(dh.v * s * (1 + z.v * (1 - s)), 1.1 * dh.e + 0.5 * dh.v.abs() * z.e), 2 * r)


def sparse_dense(layer):
    from megaeff.layers.sltrain_ops import densify

    zero = torch.zeros_like(layer.A)
    return exact(densify(zero, layer.B, layer.sparse_values, layer.sparse_index, 0.0, torch.float64))


def expected(method, layer, x, dy, r):
    """{name: Bnd} of y, dx and every parameter gradient of `layer`'s FP8 path (r: BF16 output rounding or 0)."""
    X, Dy = exact(x), exact(dy)
    if method == "lost":
        A, Bm, Ws, g = exact(layer.A), exact(layer.B), exact(layer.sparse_weight), layer.gamma
        idx = layer.channel_index.long()
        Xs = Bnd(X.v[:, idx], X.e[:, idx])
        z = fp8_y(X, A, r)
        h = silu(z, r)
        y = add(scale(fp8_y(h, Bm, r), g, r), scale(fp8_y(Xs, Ws, r), 1 - g, r), r)
        dlow, dsp = scale(Dy, g, r), scale(Dy, 1 - g, r)
        dz = silu_back(fp8_dx(dlow, Bm, r), z, r)
        dxs = fp8_dx(dsp, Ws, r)
        dx = fp8_dx(dz, A, r)
        full = torch.zeros_like(dx.v).index_add_(1, idx, dxs.v), torch.zeros_like(dx.e).index_add_(1, idx, dxs.e)
        grads = {"A": fp8_dw(dz, X, r), "B": fp8_dw(dlow, h, r), "sparse_weight": fp8_dw(dsp, Xs, r)}
        return {"y": y, "dx": add(dx, Bnd(*full), r), **grads}
    A, Bm = exact(layer.A), exact(layer.B)
    if method == "lowrank":
        h = fp8_y(X, A, r)
        dh = fp8_dx(Dy, Bm, r)
        return {"y": fp8_y(h, Bm, r), "dx": fp8_dx(dh, A, r), "A": fp8_dw(dh, X, r), "B": fp8_dw(Dy, h, r)}
    s, S = layer.scale, sparse_dense(layer)
    As = rnd(scale(A, s), EPS32)
    omega = layer.sparse_index.long()
    if method == "sltrain_dense":  # W = B (sA) + S in the compute dtype, then one FP8 linear map
        W = rnd(add(mm(Bm, As), S), r)
        G = fp8_dw(Dy, X, r)
        dv = Bnd(G.v.flatten()[omega], G.e.flatten()[omega])
        return {"y": fp8_y(X, W, r), "dx": fp8_dx(Dy, W, r), "A": scale(mm(Bm.T, G), s), "B": mm(G, As.T), **_v(dv)}
    h = fp8_y(X, As, r)  # sparse path: two FP8 linear maps plus the exact FP32 sparse product
    dh = fp8_dx(Dy, Bm, r)
    y = add(fp8_y(h, Bm, r), mm(X, S.T), r)
    dx = add(fp8_dx(dh, As, r), mm(Dy, S), r)
    gv = mm(Dy.T, X)
    dv = Bnd(gv.v.flatten()[omega], gv.e.flatten()[omega])
    return {"y": y, "dx": dx, "A": scale(fp8_dw(dh, X, r), s), "B": fp8_dw(Dy, h, r), **_v(dv)}


def _v(dv):
    return {"sparse_values": dv}


def assert_within(got, b: Bnd, what):
    excess = (got.double() - b.v).abs() - b.e * (1 + 2.0**-20) - 1e-30
    assert excess.max() <= 0, f"{what}: exceeds the bound by {excess.max().item():.3g} (bound {b.e.max().item():.3g})"


# ---------------------------------------------------------------------------------------------------- layers
def make_layer(method, ops, n_in=N_IN, n_out=N_OUT):
    layer = build_linear(n_in, n_out, name="l", method=MethodConfig(**METHODS[method]), act=ops)
    layer.init_weights("l", Initializer(3, 0.02))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # SLTrain's B starts at zero: make every factor matter
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return layer


def run(layer, x, dy, autocast=False):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(dy.to(y.dtype))
    return {"y": y.detach(), "dx": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def data(seed=0, n_in=N_IN, n_out=N_OUT, tokens=T):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, n_in, generator=gen), torch.randn(tokens, n_out, generator=gen)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_layer_within_fp8_bounds_and_takes_the_fp8_path(method):
    x, dy = data()
    policy = Fp8Activations(16, activations=False, gemm=True)
    layer = make_layer(method, policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Fp8GemmFallback)  # every GEMM here meets CUDA's rules
        got = run(layer, x, dy)
    assert policy.gemms.counts.fp8 == GEMMS[method] and policy.gemms.counts.fallback == 0
    bounds = expected(method, layer, x, dy, 0.0)
    assert set(got) == set(bounds)
    for name, b in bounds.items():
        assert_within(got[name], b, name)
    # The same layer in high precision is far inside the bound (sanity of the bound's reference values) ...
    layer.ops = HIGH_PRECISION
    hp = run(layer, x, dy)
    for name, b in bounds.items():
        assert_within(hp[name], Bnd(b.v, 1e-4 * b.v.abs().max() + torch.zeros_like(b.e)), f"high precision {name}")
    # ... and the FP8 result is not the high-precision one: quantization moves the output by ~2^-5 relative.
    assert (got["y"] - hp["y"]).abs().max() > 1e-3 * hp["y"].abs().max()


@pytest.mark.parametrize("method", ["lowrank", "lost"])
def test_layer_under_bf16_autocast(method):
    """The FP8 GEMM writes BF16 under autocast (as F.linear would), FP8 activation saving composes with it."""
    x, dy = data(1)
    policy = Fp8Activations(16, activations=False, gemm=True)
    layer = make_layer(method, policy)
    got = run(layer, x, dy, autocast=True)
    assert got["y"].dtype == torch.bfloat16 and got["dx"].dtype == torch.float32
    assert all(got[n].dtype == torch.float32 for n in got if n not in ("y", "dx"))
    dy16 = dy.to(torch.bfloat16).float()  # the gradient the backward receives
    for name, b in expected(method, layer, x, dy16, BF16).items():
        assert_within(got[name], b, name)
    # With FP8 activations saved as well (COAT's full flow) the forward is unchanged bit for bit: the GEMMs
    # already save their inputs as E4M3 codes, and LOST's silu input in 1x16 groups changes only its backward.
    both = make_layer(method, Fp8Activations(16, activations=True, gemm=True))
    got2 = run(both, x, dy, autocast=True)
    assert torch.equal(got2["y"], got["y"])
    assert torch.isfinite(got2["dx"]).all() and all(torch.isfinite(p.grad).all() for p in both.parameters())


class NoScaleGemm(Fp8Gemm):
    """Broken: the codes are multiplied as if their scales were 1."""

    def run(self, a, b, scale_a, scale_b, out_dtype):
        return super().run(a, b, torch.ones_like(scale_a), torch.ones_like(scale_b), out_dtype)


class GradAsE4M3Gemm(Fp8Gemm):
    """Broken: the incoming gradient's scale is computed for E4M3 while the codes are E5M2 (wrong format scale)."""

    def run(self, a, b, scale_a, scale_b, out_dtype):
        if a.dtype == torch.float8_e5m2:
            scale_a = scale_a * (E5M2.max / E4M3.max)
        return super().run(a, b, scale_a, scale_b, out_dtype)


@pytest.mark.parametrize("broken", [NoScaleGemm, GradAsE4M3Gemm])
def test_broken_gemms_fail_the_bounds(broken):
    x, dy = data()
    policy = Fp8Activations(16, activations=False, gemm=True)
    policy.gemms = broken()
    layer = make_layer("lost", policy)
    got = run(layer, x, dy)
    bounds = expected("lost", layer, x, dy, 0.0)
    failed = []
    for name, b in bounds.items():
        try:
            assert_within(got[name], b, name)
        except AssertionError:
            failed.append(name)
    expect = set(bounds) if broken is NoScaleGemm else {"dx", "A", "B", "sparse_weight"}
    assert set(failed) == expect, failed


def emulate_lowrank(layer, x):
    """The lowrank forward's FP8 arithmetic in float64: per-tensor E4M3 of each operand, exact products."""

    def fq(t):
        s = t.abs().amax().float() / E4M3.max
        return (t.float() / s).clamp(-E4M3.max, E4M3.max).to(E4M3.dtype).double() * s.double()

    h = (fq(x) @ fq(layer.A.detach()).t()).float()
    return fq(h) @ fq(layer.B.detach()).t()


def test_forward_equals_the_fp8_emulation_and_high_precision_does_not():
    x, _ = data(2)
    layer = make_layer("lowrank", Fp8Activations(16, activations=False, gemm=True))
    with torch.no_grad():
        y = layer(x).double()
        layer.ops = HIGH_PRECISION
        y_hp = layer(x).double()
    ref = emulate_lowrank(layer, x)
    # FP32 accumulation and the rounding of h to FP32 in the emulation: a few 2^-24 of the magnitude, allow 2^-18.
    tol = 2.0**-18 * ref.abs().max()
    assert (y - ref).abs().max() <= tol
    assert (y_hp - ref).abs().max() > 100 * tol  # a no-op FP8 GEMM fails this by far


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shapes_off_the_16_grid_fall_back_within_the_same_bounds(method):
    n_in, n_out, tokens = 40, 24, 20  # K = 40, N = 24, 20 tokens in the weight gradients: not multiples of 16
    x, dy = data(5, n_in, n_out, tokens)
    policy = Fp8Activations(16, activations=False, gemm=True)
    layer = make_layer(method, policy, n_in, n_out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(layer, x, dy)
    assert policy.gemms.counts.fallback > 0
    assert any(issubclass(c.category, Fp8GemmFallback) and "multiple of 16" in str(c.message) for c in caught)
    for name, b in expected(method, layer, x, dy, 0.0).items():
        assert_within(got[name], b, name)


def test_transposed_layouts_stay_on_the_fp8_path():
    """Autograd can hand a gradient (and a caller an input) in a transposed layout: the codes are laid out as
    CUDA wants them instead of falling back."""
    x, dy = data(7)
    policy = Fp8Activations(16, activations=False, gemm=True)
    layer = make_layer("lowrank", policy)
    t = lambda a: a.t().contiguous().t()  # noqa: E731  (same values, column-major strides)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Fp8GemmFallback)
        got = run(layer, t(x), t(dy))
    assert policy.gemms.counts.fp8 == GEMMS["lowrank"] and policy.gemms.counts.fallback == 0
    for name, b in expected("lowrank", layer, x, dy, 0.0).items():
        assert_within(got[name], b, name)


def test_high_precision_policy_is_unchanged():
    """The default policy's new GEMM hooks are the plain matmuls SLTrain's densify path used before."""
    x, dy = data(6)
    w = torch.randn(N_OUT, N_IN)
    assert torch.equal(HIGH_PRECISION.mm(x, w), F.linear(x, w))
    assert torch.equal(HIGH_PRECISION.mm_input_grad(dy, w), dy @ w)
    assert torch.equal(HIGH_PRECISION.mm_weight_grad(dy, x), dy.t() @ x)
