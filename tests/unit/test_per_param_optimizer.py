"""Per-parameter updates (megaeff/optim/per_param.py): the facade equals the ordinary optimizer, stochastic
rounding is unbiased, and bf16 weights train without an fp32 master."""

from __future__ import annotations

import math

import pytest
import torch

from megaeff.errors import ConfigError
from megaeff.optim.coat_adamw import CoatAdamW
from megaeff.optim.per_param import ROUND_CHUNK, PerParamOptimizer, stochastic_round_bf16, stochastic_round_bf16_

BF16_ULP_AT_1 = 2.0**-7  # spacing of bf16 numbers in [1, 2): 7 explicit mantissa bits


def _bf16_neighbours(x: torch.Tensor):
    lo = x.to(torch.bfloat16)  # nearest; step to the other side where needed
    lo = torch.where(lo.float() > x, torch.nextafter(lo, torch.tensor(-math.inf, dtype=torch.bfloat16)), lo)
    hi = torch.nextafter(lo, torch.tensor(math.inf, dtype=torch.bfloat16))
    return lo.float(), hi.float()


@pytest.mark.parametrize("chunk", [ROUND_CHUNK, 4096])  # one pass, and many passes over the tensor
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(chunk):
    n = 200_000
    # A quarter of an ulp above 1.0: round-to-nearest always returns 1.0, a bias of 0.25 ulp.
    x = torch.full((n,), 1.0 + 0.25 * BF16_ULP_AT_1)
    g = torch.Generator().manual_seed(0)
    r = stochastic_round_bf16_(torch.empty(n, dtype=torch.bfloat16), x, g, chunk).float()
    lo, hi = _bf16_neighbours(x)
    assert bool(((r == lo) | (r == hi)).all())
    # Each draw is lo or hi with P(hi) = 0.25: the mean's standard error is ulp*sqrt(p(1-p)/n) ~ 1e-3 ulp; allow
    # 6 standard errors. Round-to-nearest (bias 0.25 ulp) and truncation (bias 0.25 ulp) are 250 errors away.
    bias = (r.mean() - x[0]).item() / BF16_ULP_AT_1
    assert abs(bias) < 6 * math.sqrt(0.25 * 0.75 / n)
    assert abs((x.to(torch.bfloat16).float().mean() - x[0]).item() / BF16_ULP_AT_1) > 0.2  # the control fails
    # Negative values and other binades: unbiased too.
    y = torch.full((n,), -3.0 - 0.75 * 2 * 2.0**-7 * 1.0)
    ry = stochastic_round_bf16(y, torch.Generator().manual_seed(1)).float()
    ulp = 2.0 * 2.0**-7  # spacing in [2, 4)
    assert abs((ry.mean() - y[0]).item()) / ulp < 6 * math.sqrt(0.75 * 0.25 / n)


def test_stochastic_rounding_keeps_exact_values_and_non_finite():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, 2.0**-130, float("inf"), float("-inf")])
    out = stochastic_round_bf16(exact, torch.Generator().manual_seed(0)).float()
    assert torch.equal(out[:-2], exact[:-2].to(torch.bfloat16).float()) and torch.isinf(out[-2:]).all()
    assert torch.isnan(stochastic_round_bf16(torch.tensor([float("nan")]))).all()


def _params(seed=0, shapes=((64, 256), (256,), (32, 64))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _train(opt, params, steps=4, seed=1, lrs=(1e-2, 5e-3, 2e-3, 1e-3)):
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        for group in opt.param_groups:  # as the LR scheduler does: the facade's groups carry the live LR
            group["lr"] = lrs[i]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("kind", ["adamw", "coat"])
def test_facade_equals_the_ordinary_optimizer_bit_for_bit(kind):
    def make(groups):
        if kind == "coat":
            return CoatAdamW(groups, lr=1e-2, weight_decay=0.1, min_fp8_numel=1024, backend="torch")
        return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=False)

    ref_p, new_p = _params(), _params()
    groups = lambda ps: [{"params": ps[::2], "weight_decay": 0.1}, {"params": ps[1::2], "weight_decay": 0.0}]  # noqa: E731
    ref = make(groups(ref_p))
    new = PerParamOptimizer(groups(new_p), make, dict(lr=1e-2))
    _train(ref, ref_p)
    _train(new, new_p)
    for a, b in zip(ref_p, new_p):
        assert torch.equal(a, b)
    # One state dict, keyed like the ordinary optimizer's (what checkpoints read).
    assert set(new.state) == set(new_p) and all(new.inner[p].state is new.state for p in new_p)
    for a, b in zip(ref_p, new_p):
        for key, v in ref.state[a].items():
            assert torch.equal(v, new.state[b][key]), key
    # A wrong variant: the facade ignoring the scheduler's LR (inner groups frozen at construction) differs.
    frozen_p = _params()
    frozen = PerParamOptimizer(groups(frozen_p), make, dict(lr=1e-2))
    frozen.group_of = {p: {"lr": 1e-2, "weight_decay": frozen.group_of[p]["weight_decay"]} for p in frozen_p}
    _train(frozen, frozen_p)
    assert not all(torch.equal(a, b) for a, b in zip(ref_p, frozen_p))


def test_step_param_updates_one_parameter_and_frees_its_gradient():
    params = _params()
    opt = PerParamOptimizer([{"params": params}], lambda gr: torch.optim.AdamW(gr, lr=1e-2), dict(lr=1e-2))
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step_param(params[1], free_grad=True)
    assert params[1].grad is None and not torch.equal(params[1], before[1])
    assert torch.equal(params[0], before[0]) and params[0].grad is not None


def test_bf16_weights_move_under_updates_smaller_than_half_an_ulp():
    """Weights near 1.0 and an AdamW step of lr (|m/sqrt(v)| = 1 at step 1) of a quarter ulp: round-to-nearest
    never moves them, stochastic rounding moves them by lr on average (binomial bound as above)."""
    n, lr = 100_000, 0.25 * BF16_ULP_AT_1

    def run(stochastic):
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = PerParamOptimizer(
            [{"params": [p]}],
            lambda gr: torch.optim.AdamW(gr, lr=lr, weight_decay=0.0, foreach=False),
            dict(lr=lr),
            stochastic_rounding=stochastic,
        )
        p.grad = -torch.ones_like(p)  # step +lr on every element
        opt.step()
        assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
        return (p.float().mean() - 1.0).item()

    moved = run(True)
    assert abs(moved - lr) < 6 * BF16_ULP_AT_1 * math.sqrt(0.25 * 0.75 / n) + 1e-3 * lr  # + Adam's eps effect
    assert run(False) == 0.0  # round-to-nearest drops the whole update


def test_stochastic_rounding_noise_depends_on_step_not_on_process_history():
    """A resumed run rounds as the uninterrupted one: the noise is a function of (parameter, update count)."""

    def fresh():
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        make = lambda gr: torch.optim.AdamW(gr, lr=1e-3, foreach=False)  # noqa: E731
        return p, PerParamOptimizer([{"params": [p]}], make, dict(lr=1e-3), stochastic_rounding=True)

    p1, o1 = fresh()
    p2, o2 = fresh()
    for p, o in ((p1, o1), (p2, o2)):
        p.grad = torch.full_like(p, -1.0)
        o.step()
    torch.manual_seed(123)  # unrelated global RNG use between the steps changes nothing
    p1.grad, p2.grad = torch.full_like(p1, -1.0), torch.full_like(p2, -1.0)
    o1.step()
    o2.step()
    assert torch.equal(p1, p2)


def test_bf16_weights_need_autocast(compose_cfg):
    with pytest.raises(ConfigError) as exc:
        compose_cfg(["precision=fp32", "precision.param_dtype=bf16"])
    assert exc.value.field == "precision.param_dtype"
    cfg = compose_cfg(["precision=bf16", "precision.param_dtype=bf16"])
    assert cfg.precision.param_dtype == "bf16"
