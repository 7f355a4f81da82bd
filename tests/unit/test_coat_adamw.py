"""CoatAdamW (FP8 moments): state layout and bytes, agreement with AdamW, exact state round trips, dispatch."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from megaeff.kernels.fp8_adamw import select_backend
from megaeff.optim.coat_adamw import CoatAdamW
from megaeff.optim.fp8_adamw_ref import StepScalars, f32


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 300 x 256 (multiple of 128), 64 x 300 (ragged rows), a bias of 64 (small: FP32 moments).
    return nn.Sequential(nn.Linear(256, 300, bias=False), nn.Tanh(), nn.Linear(300, 64))


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 256, generator=gen)
        y = torch.randn(32, 64, generator=gen)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def coat(model, **kw):
    kw.setdefault("backend", "torch")
    return CoatAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, **kw)


def test_state_layout_and_bytes_per_parameter():
    model = tiny_net()
    opt = coat(model)
    run(model, opt, 1)
    w1, w2, b2 = model[0].weight, model[2].weight, model[2].bias
    st = opt.state[w1]
    assert st["exp_avg"].dtype == torch.float8_e4m3fn and st["exp_avg"].shape == w1.shape
    assert st["exp_avg_meta"].shape == (300 * 2, 3)
    assert opt.state[w2]["exp_avg_meta"].shape == (64 * 3, 3)  # 300 = 2 x 128 + 44 per row
    assert opt.state[b2]["exp_avg"].dtype == torch.float32  # 64 elements < min_fp8_numel
    n_fp8 = w1.numel() + w2.numel()
    fp8_bytes = sum(t.numel() * t.element_size() for p in (w1, w2) for t in opt.state[p].values())
    per_param = fp8_bytes / n_fp8
    assert per_param <= 2.25, per_param  # codes 2 + metadata 24/128 + the step counter; FP32 AdamW: 8


def test_second_moment_e5m2():
    model = tiny_net()
    opt = coat(model, second_moment="e5m2")
    run(model, opt, 2)
    assert opt.state[model[0].weight]["exp_avg_sq"].dtype == torch.float8_e5m2


def test_first_step_matches_adamw_and_training_tracks_it():
    ref_model, model = tiny_net(), tiny_net()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, weight_decay=0.1)
    opt = coat(model)
    run(ref_model, ref_opt, 1)
    run(model, opt, 1)
    # The initial FP8 state dequantizes to exact zeros: step 1 is AdamW's up to FP32 rounding order.
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    ref_losses = run(ref_model, ref_opt, 60, seed=2)
    losses = run(model, opt, 60, seed=2)
    assert abs(losses[-1] - ref_losses[-1]) / ref_losses[-1] < 0.05, (losses[-1], ref_losses[-1])


def test_small_tensors_keep_fp32_moments_with_the_same_math():
    """With every tensor below the threshold, CoatAdamW is an FP32 AdamW in the contract's op order."""
    model, ref = tiny_net(), tiny_net()
    opt = coat(model, min_fp8_numel=10**9)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    run(model, opt, 5)
    run(ref, ref_opt, 5)
    assert all(v.dtype != torch.float8_e4m3fn for s in opt.state.values() for v in s.values())
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_threshold_uses_the_logical_shape_not_the_local_one():
    model = tiny_net()
    shard = model[2].bias
    shard.logical_shape = (8192,)  # as a parallel wrapper marks a shard of a large tensor
    opt = coat(model)
    assert opt.uses_fp8(shard)
    del shard.logical_shape
    assert not opt.uses_fp8(shard)


def test_state_dict_round_trip_is_bit_exact():
    model = tiny_net()
    opt = coat(model)
    run(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    clone = tiny_net(seed=5)
    clone.load_state_dict(saved["model"])
    clone_opt = coat(clone)
    clone_opt.load_state_dict(saved["optim"])
    for p, q in zip(model.parameters(), clone.parameters()):
        for key, value in opt.state[p].items():
            other = clone_opt.state[q][key]
            assert other.dtype == value.dtype, key
            assert torch.equal(other.view(torch.uint8) if other.dtype.itemsize == 1 else other,
                               value.view(torch.uint8) if value.dtype.itemsize == 1 else value), key
    assert run(model, opt, 4, seed=9) == run(clone, clone_opt, 4, seed=9)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_check_state_names_the_mismatch():
    model = tiny_net()
    opt = coat(model)
    run(model, opt, 1)
    w = model[0].weight
    bad = dict(opt.state[w], exp_avg=opt.state[w]["exp_avg"].float())
    assert "exp_avg is (300, 256) torch.float32, expected (300, 256) torch.float8_e4m3fn" in opt.check_state("w", w, bad)
    adamw_state = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(w), "exp_avg_sq": torch.zeros_like(w)}
    assert "missing 'exp_avg_meta'" in opt.check_state("w", w, adamw_state)
    assert opt.check_state("w", w, opt.state[w]) is None


def test_refuses_non_fp32_master_weights():
    w = nn.Parameter(torch.zeros(64, 128, dtype=torch.bfloat16))
    w.grad = torch.ones_like(w)
    with pytest.raises(RuntimeError, match="FP32 master weights"):
        CoatAdamW([w], backend="torch").step()


def test_step_scalars_are_fp32_values():
    s = StepScalars.compute(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7)
    for value in vars(s).values():
        assert value == f32(value)
    assert s.step_size == f32(3e-3 / (1 - 0.9**7))
    with pytest.raises(ValueError, match="step counts from 1"):
        StepScalars.compute(1e-3, 0.9, 0.95, 1e-8, 0.0, 0)


def test_dispatcher_falls_back_and_explains_missing_backends():
    assert select_backend("torch", torch.device("cpu")).name == "torch"
    assert select_backend("auto", torch.device("cpu")).name in ("cpp", "torch")
    with pytest.raises(RuntimeError, match="'cuda' is not available on cpu"):
        select_backend("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown FP8 AdamW backend"):
        select_backend("fastest", torch.device("cpu"))


def test_bad_format_is_rejected():
    with pytest.raises(ValueError, match="unknown FP8 format 'e3m4'"):
        coat(tiny_net(), second_moment="e3m4")
