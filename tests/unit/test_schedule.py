"""Learning-rate schedule: warmup, cosine decay to min_lr_ratio, constant, and the stateful scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from megaeff.config.schema import OptimConfig
from megaeff.optim.builder import build_optimizer, param_groups
from megaeff.optim.schedule import LRScheduler, lr_multiplier


def test_warmup_is_linear_from_zero():
    assert lr_multiplier(0, 100, 10, 0.1) == 0.0
    assert lr_multiplier(5, 100, 10, 0.1) == pytest.approx(0.5)
    assert lr_multiplier(1, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, 0.1) == pytest.approx(0.9)
    assert lr_multiplier(10, 100, 10, 0.1) == pytest.approx(1.0)
    values = [lr_multiplier(s, 100, 10, 0.1) for s in range(11)]
    assert values == sorted(values)


def test_cosine_midpoint_end_and_after():
    total, warmup, min_ratio = 111, 10, 0.1
    decay_steps = total - 1 - warmup  # 100
    mid = warmup + decay_steps // 2
    assert lr_multiplier(mid, total, warmup, min_ratio) == pytest.approx((1 + min_ratio) / 2)
    assert lr_multiplier(total - 1, total, warmup, min_ratio) == pytest.approx(min_ratio)
    for step in (total, total + 1, 10 * total):
        assert lr_multiplier(step, total, warmup, min_ratio) == pytest.approx(min_ratio)
    # Quarter point of the cosine.
    q = warmup + decay_steps // 4
    expected = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_multiplier(q, total, warmup, min_ratio) == pytest.approx(expected)
    # Monotone non-increasing after warmup, never below min.
    values = [lr_multiplier(s, total, warmup, min_ratio) for s in range(warmup, total + 5)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))
    assert min(values) == pytest.approx(min_ratio)


def test_min_lr_ratio_zero_reaches_zero():
    assert lr_multiplier(49, 50, 0, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(0, 50, 0, 0.0) == pytest.approx(1.0)


def test_constant_schedule():
    assert lr_multiplier(0, 100, 10, 0.1, "constant") == 0.0
    assert lr_multiplier(5, 100, 10, 0.1, "constant") == pytest.approx(0.5)
    for step in (10, 50, 99, 100, 1000):
        assert lr_multiplier(step, 100, 10, 0.1, "constant") == 1.0
    assert lr_multiplier(0, 100, 0, 0.1, "constant") == 1.0


def test_zero_warmup_starts_at_one():
    assert lr_multiplier(0, 100, 0, 0.1) == 1.0
    assert lr_multiplier(1, 100, 0, 0.1) < 1.0
    assert lr_multiplier(99, 100, 0, 0.1) == pytest.approx(0.1)


def test_degenerate_lengths_do_not_divide_by_zero():
    # total_steps == warmup_steps + 1 (no decay steps), warmup == total, and a single-step run.
    for step, total, warmup in [(10, 11, 10), (11, 11, 10), (9, 10, 10), (10, 10, 10), (0, 1, 0), (1, 1, 0)]:
        value = lr_multiplier(step, total, warmup, 0.1)
        assert math.isfinite(value) and 0.1 - 1e-12 <= value <= 1.0
    assert lr_multiplier(0, 1, 0, 0.1) == pytest.approx(1.0)


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2, bias=False))


def _optim(model, lr=1e-2):
    ocfg = OptimConfig(lr=lr, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, impl="auto")
    return build_optimizer(model, ocfg, torch.device("cpu"))


def test_param_groups_decay_matrices_only():
    groups = param_groups(_model(), 0.1)
    assert len(groups) == 2
    assert groups[0]["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.dim() < 2 for p in groups[1]["params"])
    opt, impl = _optim(_model())
    assert impl == "fused" and isinstance(opt, torch.optim.AdamW)  # auto: fused on CPU too


def test_scheduler_sets_param_group_lrs_from_initial_lr():
    opt, _ = _optim(_model(), lr=1e-2)
    sched = LRScheduler(opt, total_steps=20, warmup_steps=4, min_lr_ratio=0.1)
    assert len(opt.param_groups) == 2
    assert all(g["initial_lr"] == 1e-2 for g in opt.param_groups)
    assert sched.get_last_lr() == [0.0, 0.0]
    for step in range(1, 25):
        sched.step()
        expected = 1e-2 * lr_multiplier(step, 20, 4, 0.1)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(expected)
            assert g["initial_lr"] == 1e-2  # the peak is never overwritten
    assert sched.get_last_lr() == pytest.approx([1e-3, 1e-3])


def test_scheduler_state_dict_round_trip():
    opt, _ = _optim(_model())
    sched = LRScheduler(opt, 50, 5, 0.1)
    for _ in range(17):
        sched.step()
    state = sched.state_dict()
    assert state == {"step_count": 17}
    lrs = sched.get_last_lr()

    opt2, _ = _optim(_model())
    sched2 = LRScheduler(opt2, 50, 5, 0.1)
    assert sched2.get_last_lr() != lrs
    sched2.load_state_dict(state)
    assert sched2.step_count == 17
    assert sched2.get_last_lr() == pytest.approx(lrs)
    sched.step()
    sched2.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())


def test_scheduler_drives_optimizer_updates():
    """The LR the scheduler sets is the one AdamW uses: at multiplier 0 the weights do not move, at the next step
    (multiplier 1/2) they move by exactly lr/2 per element (a no-op optimizer passed the first check alone)."""
    model = nn.Linear(3, 3, bias=False)
    opt, _ = _optim(model)
    for g in opt.param_groups:
        g["weight_decay"] = 0.0
    sched = LRScheduler(opt, 10, 2, 0.1)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()

    before = model.weight.detach().clone()
    step()
    assert torch.equal(model.weight.detach(), before)
    sched.step()
    step()
    # Twice the same gradient g: AdamW's bias-corrected moments are m = g and v = g^2 (betas 0.9, 0.95), so the
    # step is lr * 1/2 * g / (|g| + eps) = 5e-3 sign(g); |g| >= 0.1 here, so eps moves it by < 1e-7 relative, and
    # the FP32 roundings of weights below 1 by < 2 * 2^-24 / 5e-3 = 2.4e-5: rtol 1e-4. Multiplier 1 (an off-by-one
    # schedule) or 0 (no update) would be 100% off.
    g = model.weight.grad
    assert g.abs().min() > 0.1 and model.weight.abs().max() < 1
    torch.testing.assert_close(before - model.weight.detach(), 5e-3 * g.sign(), rtol=1e-4, atol=0)
