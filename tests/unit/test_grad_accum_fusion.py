"""Gradient-accumulation fusion (`precision.grad_accum_fusion`, megaeff/layers/grad_accum_fusion.py): the dense
weights' gradients summed over micro-batches in fp32 `main_grad`, against the exact sum and against the bf16
`.grad` accumulation it replaces; a trainer run with it; the combinations it refuses. The apex kernel's test is
in tests/gpu/test_accelerators.py, the 2-rank data-parallel one in tests/distributed/test_grad_accum_fusion_dp.py.

Bounds. bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-9 of itself (half an ulp of 2^-8
relative spacing at worst), and every micro-batch of the unfused path rounds twice (its GEMM output, then the
running sum). fp32 keeps 24: a dot product of n terms computed in fp32 is within n * 2^-24 * sum|terms| of the
exact one (the standard gamma_n bound; n = the tokens of all micro-batches, plus one add per micro-batch).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from megaeff.distributed.dims import ParallelDims
from megaeff.distributed.parallelize import parallelize
from megaeff.errors import ConfigError
from megaeff.layers import grad_accum_fusion as gaf
from megaeff.layers.linear import DenseLinear
from megaeff.models.llama import build_llama
from tests.helpers import compose

ONE = ParallelDims(tp=1, cp=1, dp=1, pp=1, world_size=1)
U32 = 2.0**-24
BF16 = ["precision=bf16", "precision.param_dtype=bf16"]
FUSED = [*BF16, "precision.grad_accum_fusion=true"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def rand(*shape, seed, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def fp32_bound(pairs, terms: int) -> torch.Tensor:
    """Elementwise gamma bound of an fp32 sum of dy^T x over `pairs` with `terms` products per element."""
    mag = sum(dy.double().abs().t() @ x.double().abs() for x, dy in pairs)
    return terms * U32 * mag


# ---------------------------------------------------------------------------------------------- the Function
def test_main_grad_is_the_fp32_sum_of_the_micro_batches_and_grad_input_is_unchanged():
    w = rand(24, 40, seed=0)
    plain, fused = DenseLinear(40, 24), DenseLinear(40, 24)
    plain.weight.data, fused.weight.data = w.clone(), w.clone()
    assert gaf.enable(fused) == [fused.weight]
    pairs, k, tokens = [], 6, 2 * 17
    for mb in range(k):
        x = rand(2, 17, 40, seed=10 + mb, dtype=torch.float32)  # the residual stream: fp32 under autocast
        dy = rand(2, 17, 24, seed=50 + mb)
        grads = []
        for layer in (plain, fused):
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(xi)
            y.backward(dy)
            grads.append(xi.grad)
        assert y.dtype == torch.bfloat16
        assert torch.equal(grads[0], grads[1])  # grad_input: the very GEMM of the plain path
        pairs.append((x.to(torch.bfloat16).reshape(-1, 40), dy.reshape(-1, 24)))
    assert fused.weight.grad is None and fused.weight.main_grad.dtype == torch.float32
    exact = sum(dy.double().t() @ x.double() for x, dy in pairs)
    bound = fp32_bound(pairs, tokens + k)
    assert ((fused.weight.main_grad.double() - exact).abs() <= bound).all()
    # The bound is tight enough to tell: the bf16 .grad accumulation of the same products breaks it.
    assert ((plain.weight.grad.double() - exact).abs() > bound).any()


def test_main_grad_hooks_run_after_each_accumulation_and_zeroing_follows_zero_grad():
    layer = DenseLinear(8, 4)
    layer.weight.data = rand(4, 8, seed=1)
    (w,) = gaf.enable(layer)
    seen = []
    handle = gaf.add_main_grad_hook(w, lambda p: seen.append(p.main_grad.clone()))
    x = rand(3, 8, seed=2)
    for _ in range(2):
        layer(x).float().sum().backward()
    assert len(seen) == 2 and torch.equal(seen[1], 2 * seen[0]) and torch.equal(gaf.grad_of(w), seen[1])
    handle.remove()
    gaf.zero_main_grads([w], set_to_none=False)
    assert torch.equal(w.main_grad, torch.zeros_like(w.main_grad))
    gaf.zero_main_grads([w])
    assert w.main_grad is None and gaf.grad_of(w) is None
    layer(x).float().sum().backward()
    assert len(seen) == 2  # removed


# ---------------------------------------------------------------------------------------------- a tiny model
def accumulated_grads(overrides, k: int, capture=None):
    """The smoke Llama (bf16 weights) after k micro-batches' backward: {name: gradient as the step reads it}."""
    cfg = compose(["experiment=smoke", *overrides])
    model = parallelize(build_llama(cfg.model, cfg.method, device="meta"), ONE, cfg).module
    gen = torch.Generator().manual_seed(3)
    for _ in range(k):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        (loss / (k * 64)).backward()
    return model, {n: gaf.grad_of(p) for n, p in model.named_parameters()}


def test_fused_main_grads_are_much_closer_to_the_exact_sum_than_bf16_accumulation(monkeypatch):
    """With identical weights and data both runs feed every dense layer the same (x, dy) bits (grad_input is the
    plain GEMM), so the exact sum of each layer's dy^T x, captured in float64 from the fused run, is the reference
    of both. (An fp32-weights run is not: its embedding and residual stream are fp32, so its gradients differ
    from either bf16 run by activation rounding of the very size measured here.)

    Expected: the unfused bf16 sum rounds each of the k=8 micro-batch GEMM outputs and each running sum, each a
    relative error up to 2^-9 (about 2^-9/sqrt(3) rms): some 1e-3 in norm. The fused sum is one fp32 sum of
    8 x 64 products: within about 2^-24 x 64 (plus cancellation) of the exact one, some 1e-6 at most. The ratio
    is then ~2^15 / 64 = 500 or more; 50 leaves room for cancellation and still means "clearly smaller"."""
    exact = {}
    real = gaf.accumulate_wgrad

    def capture(main_grad, x2d, dy2d):
        exact.setdefault(id(main_grad), [main_grad, 0])[1] += dy2d.double().t() @ x2d.double()
        return real(main_grad, x2d, dy2d)

    monkeypatch.setattr(gaf, "accumulate_wgrad", capture)
    fused_model, fused = accumulated_grads(FUSED, 8)
    _, unfused = accumulated_grads(BF16, 8)
    ref = {n: exact[id(p.main_grad)][1] for n, p in fused_model.named_parameters() if gaf.is_fused(p)}
    assert len(ref) == 2 * 7  # q k v o gate up down in each of the 2 blocks; norms, embedding, head keep .grad

    def rel(got, want):
        return float((got.double() - want).norm() / want.norm())

    err_fused = max(rel(fused[n], r) for n, r in ref.items())
    err_bf16 = max(rel(unfused[n], r) for n, r in ref.items())
    print(f"max relative error vs the exact sum over dense weights: fused {err_fused:.3g}, bf16 .grad {err_bf16:.3g}")
    assert all(fused[n].dtype == torch.float32 and unfused[n].dtype == torch.bfloat16 for n in ref)
    assert err_fused < 64 * 8 * U32 * 16  # ~3e-5: the fp32 sum, with generous room for cancellation
    assert err_bf16 > 2**-9 / 8  # the bf16 path is really rounding at ~2^-9
    assert err_fused * 50 < err_bf16
    for n, g in unfused.items():  # the other parameters are untouched by the switch
        if n not in ref:
            assert fused[n].dtype == torch.bfloat16 and torch.equal(fused[n], g), n


# ---------------------------------------------------------------------------------------------- the trainer
def fit(*overrides):
    from megaeff.train.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="gaf-")
    cfg = compose(["experiment=smoke", f"run_dir={run_dir}", "train.plot=false", "train.threads=1", *overrides])
    trainer = Trainer(cfg, ONE, Path(run_dir))
    try:
        result = trainer.fit()
        return result.losses, sorted(n for n, p in trainer.model.named_parameters() if gaf.is_fused(p))
    finally:
        trainer.close()


def test_trainer_steps_with_the_switch_match_the_unfused_run_within_bf16_round_off(monkeypatch):
    """4 steps of 4 micro-batches: the first loss is computed before any update (bit-equal); the later ones move
    by updates that differ only in the gradient's rounding, far below one bf16 rounding of the loss (2^-8).
    Activation checkpointing changes nothing.
    A broken variant (the fused weights never updated) misses the bound: the tolerance can tell."""
    common = [*BF16, "train.grad_accum=4", "train.steps=4", "train.eval_interval=0", "train.ckpt_interval=0"]
    off, none_fused = fit(*common)
    on, fused = fit(*common, "precision.grad_accum_fusion=true")
    assert none_fused == [] and len(fused) == 14
    print("losses off:", off, "on:", on)
    assert on[0] == off[0]
    assert on == pytest.approx(off, rel=2**-8)
    recomputed, _ = fit(*common, "precision.grad_accum_fusion=true", "train.activation_checkpointing=true")
    assert recomputed == on  # the recomputed forward feeds the same Function: bit for bit

    monkeypatch.setattr("megaeff.optim.per_param.grad_of", lambda p: None)  # fused weights get no update
    frozen, _ = fit(*common, "precision.grad_accum_fusion=true")
    print("losses with the fused weights frozen:", frozen)
    assert frozen != pytest.approx(off, rel=2**-8)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "extra, field",
    [
        (["precision=bf16", "precision.grad_accum_fusion=true"], "precision.param_dtype"),
        ([*FUSED, "method=lowrank", "method.rank=8"], "method.name"),
        ([*FUSED, "optim.in_backward=true"], "optim.in_backward"),
        ([*FUSED, "parallel.dp_impl=fssdp"], "parallel.dp_impl"),
        ([*FUSED, "model.moe_experts=4"], "model.moe_experts"),
        ([*FUSED, "train.compile=true"], "train.compile"),
        (
            [
                "precision=coat",
                "precision.autocast_bf16=true",
                "precision.param_dtype=bf16",
                "precision.fp8_optimizer_states=false",
                "precision.fp8_gemm=false",
                "precision.grad_accum_fusion=true",
            ],
            "precision.fp8_activations",
        ),
    ],
)
def test_refusals_name_the_field(extra, field):
    with pytest.raises(ConfigError) as exc:
        compose(["experiment=smoke", *extra])
    assert exc.value.field == field, str(exc.value)
    if field != "precision.param_dtype":
        assert "precision.grad_accum_fusion=false" in str(exc.value)


def test_an_fp8_activation_policy_is_refused_where_layers_are_switched():
    layer = DenseLinear(8, 4, ops=_fp8_ops())
    with pytest.raises(ValueError, match="activation policy"):
        gaf.enable(torch.nn.Sequential(layer))


def _fp8_ops():
    from megaeff.precision.fp8_activations import activation_ops

    cfg = compose(["experiment=smoke", "precision=coat", "precision.fp8_gemm=false"])
    return activation_ops(cfg.precision)


@pytest.mark.parametrize("axis", ["parallel.tp=2", "parallel.pp=2", "parallel.cp=2"])
def test_tensor_pipeline_and_context_parallel_layouts_are_accepted(axis):
    """Lifted refusals: these layouts train with fusion (tests/distributed/test_grad_accum_fusion_layouts.py)."""
    cfg = compose(["experiment=smoke", *FUSED, axis])
    assert cfg.precision.grad_accum_fusion
