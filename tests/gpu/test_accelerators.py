"""One test per optional accelerator of the backend report (megaeff/train/backends.py), against megaeff's own path.

Each runs where its backend exists and is skipped, with the probe's reason, where it does not (on a CPU machine:
all of them). tools/gpu_check.sh runs this file on a GPU and treats a skip there as a missing install. The CPU
kernels are tested elsewhere: the C++ FP8 AdamW kernel in tests/unit/test_fp8_adamw_kernels.py, torch.compile on
CPU by the train.compile equivalence tests.
"""

from __future__ import annotations

import pytest
import torch

from megaeff.layers.apex_ops import rmsnorm_unavailable
from megaeff.layers.norm import RMSNorm
from megaeff.layers.ops import HIGH_PRECISION
from megaeff.train.backends import probe

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def found():
    return probe("cuda")


def need(found, name: str) -> None:
    """Skip, naming the probe's reason, unless `name` is installed and a CUDA device is there."""
    cuda = "" if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device"
    if not found[name].found:
        pytest.skip(
            f"{name}: {found[name].reason}"
            + (f"; {cuda}" if cuda and "no CUDA device" not in found[name].reason else "")
        )
    if cuda:
        pytest.skip(f"{name} {found[name].version} is installed, but {cuda}")


def randn(*shape, seed, device="cuda", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------ apex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apex_fused_rmsnorm_matches_the_formula(found, dtype):
    need(found, "apex.fused_rmsnorm")
    norm = RMSNorm(1024, eps=1e-6).cuda()
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(1024, generator=torch.Generator().manual_seed(1)))
    x = randn(256, 1024, seed=0, dtype=dtype).requires_grad_()
    assert rmsnorm_unavailable(x, norm.weight, HIGH_PRECISION) is None  # the apex path is the one taken
    y = norm(x)
    dy = randn(256, 1024, seed=2, dtype=dtype)
    y.backward(dy)
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    ref = HIGH_PRECISION.rmsnorm(x, norm.weight, norm.eps)
    ref.backward(dy)
    assert y.dtype == ref.dtype == dtype
    # fp32: the mean of 1024 squares summed in another order (<= ~1024 * 2^-24 relative, ~1e-5 in the worst case)
    # and CUDA's rsqrt; bf16 adds one rounding of values that differ by that much, i.e. at most one bf16 step.
    # A wrong formula (no weight, no eps, mean instead of rms) is off by O(1).
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(gx.float(), x.grad.float(), rtol=10 * rtol, atol=10 * rtol)
    # The weight gradient sums 256 rows of dy * x / rms(x) (rms ~ 1 here): each term is off by ~rtol relative, so
    # the sum by at most rtol times the sum of magnitudes.
    scale = (dy.float().abs() * x.float().abs()).sum(0).max().item()
    torch.testing.assert_close(gw, norm.weight.grad, rtol=0, atol=rtol * scale + 1e-6)


def test_apex_adamw_matches_torch_adamw(found):
    need(found, "apex.multi_tensor_adam")
    from megaeff.optim.apex_adam import ApexAdamW

    shapes = [(64, 48), (1000,), (3, 5, 7)]
    params = [[randn(*s, seed=i).requires_grad_() for i, s in enumerate(shapes)] for _ in range(2)]

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]

    lr, steps = 1e-3, 5
    ours = ApexAdamW(groups(params[0]), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(groups(params[1]), lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for step in range(steps):
        for ps in params:
            for i, p in enumerate(ps):
                p.grad = randn(*p.shape, seed=100 * step + i)
        ours.step()
        ref.step()
    # Same AdamW, other operation order: per step the updates (~lr) differ by fp32 round-off (~1e-6 lr) plus one
    # ulp of p (~1e-7); 5 steps stay below 1e-6. Skipping the update would be off by ~5 lr = 5e-3.
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # torch.optim.AdamW's state dict: a checkpoint of either loads into the other.
    state = ours.state_dict()
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(state["state"][0]["step"]) == steps
    ref.load_state_dict(state)


def test_apex_wgrad_gemm_accumulates_the_fp32_sum_into_main_grad(found):
    """precision.grad_accum_fusion on CUDA: the fused dense layer's weight gradient goes through apex's
    wgrad_gemm_accum_fp32 into fp32 main_grad. bf16 products are exact in fp32, so every element is an fp32 sum of
    the 4 x 256 products (plus 4 adds into main_grad) in some order: within (n = 1028) x 2^-24 x sum|terms| of the
    exact sum (a TF32 or bf16-output GEMM would be ~2^-11 or 2^-9 off and fail it); grad_input is the plain
    layer's bf16 GEMM (cuBLAS may pick another algorithm per call: within one bf16 rounding, 2^-8)."""
    need(found, "apex.grad_accum_fusion")
    from megaeff.layers import grad_accum_fusion as gaf
    from megaeff.layers.linear import DenseLinear

    w = randn(512, 1024, seed=0, dtype=torch.bfloat16) / 32
    plain, fused = DenseLinear(1024, 512).cuda(), DenseLinear(1024, 512).cuda()
    plain.weight.data, fused.weight.data = w.clone(), w.clone()
    gaf.enable(fused)
    pairs = []
    for mb in range(4):
        x = randn(2, 128, 1024, seed=10 + mb)
        dy = randn(2, 128, 512, seed=20 + mb, dtype=torch.bfloat16)
        assert gaf.wgrad_kernel_unavailable(x.to(torch.bfloat16)) is None  # apex's kernel is the path taken
        grads = []
        for layer in (plain, fused):
            xi = x.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                layer(xi).backward(dy)
            grads.append(xi.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=2.0**-8, atol=1e-6)
        pairs.append((x.to(torch.bfloat16).reshape(-1, 1024).double(), dy.reshape(-1, 512).double()))
    assert fused.weight.grad is None and fused.weight.main_grad.dtype == torch.float32
    exact = sum(dy.t() @ x for x, dy in pairs)
    bound = (4 * 256 + 4) * 2.0**-24 * sum(dy.abs().t() @ x.abs() for x, dy in pairs)
    assert ((fused.weight.main_grad.double() - exact).abs() <= bound).all()
    assert ((plain.weight.grad.double() - exact).abs() > bound).any()  # the bf16 .grad sum does not meet it


# ------------------------------------------------------------------------------------------------ flash-attn
def test_flash_attn_matches_sdpa(found):
    need(found, "flash_attn")
    from megaeff.layers.attention import FlashAttention, MathAttention

    q, k, v = (randn(2, 8, 256, 64, seed=s, dtype=torch.bfloat16) for s in range(3))
    out, lse = FlashAttention().forward_with_lse(q, k, v, causal=True)
    ref, ref_lse = MathAttention().forward_with_lse(q, k, v, causal=True)
    # bf16 operands, fp32 accumulation on both sides: the outputs differ by bf16 rounding (2^-8 relative).
    torch.testing.assert_close(out.float(), ref.float(), rtol=2.0**-7, atol=2.0**-7)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------ FP8 AdamW kernels (exact)
@pytest.mark.parametrize("name", ["csrc.fp8_adamw_cuda", "triton"])
def test_fp8_adamw_cuda_kernels_are_bit_exact(found, name):
    need(found, name)
    from megaeff.kernels import fp8_adamw_cuda, fp8_adamw_triton
    from tests.unit.test_fp8_adamw_kernels import run_against_reference

    kernel = fp8_adamw_cuda.update if name.startswith("csrc") else fp8_adamw_triton.update

    def update(es):
        kernel(es)
        torch.cuda.synchronize()

    run_against_reference(update, "cuda", ("e4m3", "e5m2"), True, 0.1)


# ---------------------------------------------------------------------------------------------------- FP8 GEMM
def test_scaled_mm_on_cuda_matches_the_dequantized_product(found):
    need(found, "fp8_gemm")
    from megaeff.precision.act_quant import E4M3, E5M2, quantize_tensor
    from megaeff.precision.scaled_mm import scaled_mm

    for fa, fb in [(E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2)]:
        a, w = quantize_tensor(randn(32, 64, seed=12), fa), quantize_tensor(randn(48, 64, seed=13), fb)
        b = w.codes.t()  # column-major, as cuBLASLt wants
        ref = (a.codes.float() * a.scale) @ (b.float() * w.scale)
        # FP8 products are exact in fp32; the K = 64 sums differ in order only (same bound as the CPU test).
        tol = 64 * 2.0**-24 * ((a.codes.float().abs() * a.scale) @ (b.float().abs() * w.scale)) + 1e-30
        assert ((scaled_mm(a.codes, b, a.scale, w.scale, torch.float32) - ref).abs() <= tol).all()
        out = scaled_mm(a.codes, b, a.scale, w.scale, torch.bfloat16)
        assert ((out.float() - ref).abs() <= 2.0**-8 * ref.abs() + tol).all()


# ------------------------------------------------------------------------------------------------ torch.compile
def test_torch_compile_on_cuda_matches_eager(found):
    need(found, "torch.compile")
    norm = RMSNorm(256).cuda()
    norm.init_weights()
    x = randn(64, 256, seed=5)
    compiled = torch.compile(norm)
    # Inductor fuses the same fp32 formula; its reduction order may differ (fp32 round-off).
    torch.testing.assert_close(compiled(x), HIGH_PRECISION.rmsnorm(x, norm.weight, norm.eps), rtol=1e-5, atol=1e-5)
