"""The Triton FP8 AdamW kernel (megaeff/kernels/fp8_adamw_triton.py) matches the torch reference bit for bit, in
the Triton interpreter on CPU (TRITON_INTERPRET=1), and CoatAdamW gives the same run on it as on the torch backend.

The backend reads TRITON_INTERPRET when it launches (triton.knobs reads the environment on every access) and wraps
its kernel for either mode itself, so setting the variable per test is enough whatever imported triton first.
The interpreter costs about 15 ms per group and launch, hence the small shapes: every group kind of the spec is
still there (full, ragged, multi-row, 1-D), and the special groups are spread over the tensors.

The reference is the one that ships, unpatched: its square roots (`group_quant.sqrt_rn`) are correctly rounded,
like the kernel's tl.sqrt_rn (numpy's sqrt in the interpreter, sqrt.rn.f32 on a GPU). On a CUDA device the
update test also runs the compiled kernel against the CPU reference (skipped without one).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from megaeff.kernels import fp8_adamw_triton  # noqa: E402
from megaeff.kernels.fp8_adamw import select_backend  # noqa: E402
from megaeff.kernels.fp8_adamw_ref import StepScalars, reference_update  # noqa: E402
from megaeff.optim.coat_adamw import CoatAdamW  # noqa: E402
from megaeff.precision.fp8 import get_format  # noqa: E402
from megaeff.precision.group_quant import GroupLayout  # noqa: E402
from tests.unit.fp8_adamw_cases import STATE, bits, entries, fit_regression, new_state  # noqa: E402

# 8 steps: the special groups act from the first step on; every step costs ~0.5 s in the interpreter.
STEPS = 8
# 128-multiple rows, ragged rows, a 3-D tensor with ragged rows, 2-row groups (last dim 48 < 128), a 1-D vector.
SHAPES = [(1, 384), (1, 352), (1, 2, 130), (6, 48), (300,)]


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=["interpreter", "cuda"])
def device(request, monkeypatch):
    """Where the kernel runs: CPU tensors in the interpreter, or CUDA tensors compiled (skipped without a GPU)."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


def special_group(kind: int, w: int, gen: torch.Generator, fixed: torch.Generator) -> torch.Tensor:
    sign = torch.sign(torch.randn(w, generator=gen))
    if kind == 0:
        return torch.zeros(w)  # all zero: stays zero (scale 0)
    if kind == 1:
        return 0.37 * torch.sign(torch.randn(w, generator=fixed))  # constant magnitude at every step
    if kind == 2:
        return torch.where(torch.arange(w) % 2 == 0, 1e-30, 1e3) * sign  # huge ratio: k clamps to 1, -0 codes
    if kind == 3:
        return torch.exp(torch.empty(w).uniform_(-50.7, -43.7, generator=gen)) * sign  # v in the FP32 subnormals
    return float(torch.rand(1, generator=gen)) * sign  # constant magnitude at this step only


def gradient(shape, step: int, seed: int) -> torch.Tensor:
    """Gradients over ~8 decades with exact zeros; group j of tensor `seed` is special group (seed + j) % 6 for
    j < 2, so the five tensors together hold every kind, in full, ragged and multi-row groups."""
    lay = GroupLayout.for_shape(shape)
    gen = torch.Generator().manual_seed(1000 * seed + step)
    fixed = torch.Generator().manual_seed(seed)
    w = lay.group_width
    g = lay.to_groups(torch.randn(shape, generator=gen) * torch.exp2(torch.randn(shape, generator=gen) * 4))
    g = torch.where(torch.rand(g.shape, generator=gen) < 0.1, 0.0, g)
    for j in range(min(2, lay.n_groups)):
        kind = (seed + j) % 6
        if kind < 5:
            g[j] = special_group(kind, w, gen, fixed)
    return lay.from_groups(g).reshape(shape)


@pytest.mark.parametrize(
    "v_format,expand,weight_decay", [("e4m3", True, 0.1), ("e5m2", True, 0.0), ("e5m2", False, 0.1)]
)
def test_update_matches_reference(device, v_format, expand, weight_decay):
    m_fmt, v_fmt = get_format("e4m3"), get_format(v_format)
    ref = [new_state(shape, m_fmt, v_fmt, seed) for seed, shape in enumerate(SHAPES)]
    got = [{k: t.clone().to(device) for k, t in st.items()} for st in ref]
    for step in range(1, STEPS + 1):
        s = StepScalars.compute(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, step=step)
        grads = [gradient(shape, step, seed) for seed, shape in enumerate(SHAPES)]
        reference_update(entries(ref, grads, s, m_fmt, v_fmt, expand))
        fp8_adamw_triton.update(entries(got, [g.to(device) for g in grads], s, m_fmt, v_fmt, expand))
        for i, (a, b) in enumerate(zip(ref, got)):
            for key in STATE:
                x, y = bits(a[key]), bits(b[key].cpu())
                assert torch.equal(x, y), f"step {step}, {SHAPES[i]}: {key} differs in {int((x != y).sum())} places"
    # The special groups did what they are there for.
    got = [{k: t.cpu() for k, t in st.items()} for st in got]
    v_meta = torch.cat([st["v_meta"] for st in got])
    assert (v_meta[:, 0] == 0).any() and (v_meta[:, 0] == 2.0**-8).any()
    if expand:
        assert (v_meta[:, 1] > 1).any() and (v_meta[:, 1] == 1).any()
    assert (torch.cat([st["m_codes"].view(torch.uint8).flatten() for st in got]) == 0x80).any()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_every_fp8_value_midpoint_and_neighbour(interpreter, fmt):
    """The in-kernel encoder and decoder on every finite FP8 value, the midpoints (ties to even) and their FP32
    neighbours, subnormals included: with beta1 = 0, no expansion and FMAX in every group, m = g and scale = 1,
    so the m codes are exactly the FP8 rounding of the gradient. A second step decodes them all."""
    f = get_format(fmt)
    grid = torch.arange(256, dtype=torch.uint8).view(f.dtype).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    pos = torch.cat([grid, mids, torch.nextafter(mids, torch.zeros(1)), torch.nextafter(mids, torch.full((1,), 1e9))])
    vals = torch.cat([pos, -pos])
    n_groups = -(-vals.numel() // 127)
    g = torch.zeros(n_groups, 128)
    g[:, 0] = f.max
    body = torch.zeros(n_groups * 127)
    body[: vals.numel()] = vals
    g[:, 1:] = body.view(n_groups, 127)
    ref = new_state(tuple(g.shape), f, f, 0)
    got = {k: t.clone() for k, t in ref.items()}
    for step, beta1 in ((1, 0.0), (2, 0.5)):
        s = StepScalars.compute(lr=1e-3, beta1=beta1, beta2=0.0, eps=1e-8, weight_decay=0.0, step=step)
        reference_update(entries([ref], [g], s, f, f, False))
        fp8_adamw_triton.update(entries([got], [g], s, f, f, False))
        if step == 1:
            assert torch.equal(got["m_meta"][:, 0], torch.ones(n_groups))
            m = g + 0.0  # what the update computes: 0 * m0 + g, so -0 becomes +0
            assert torch.equal(bits(got["m_codes"]), bits(m.clamp(-f.max, f.max).to(f.dtype)))
        for key in STATE:
            assert torch.equal(bits(ref[key]), bits(got[key])), f"step {step}: {key}"


def test_availability_follows_the_interpreter_flag(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = fp8_adamw_triton.available("cpu")
    assert not ok and "TRITON_INTERPRET" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_backend("triton", torch.device("cpu"))
    assert not fp8_adamw_triton.available("meta")[0]
    if not torch.cuda.is_available():
        ok, reason = fp8_adamw_triton.available("cuda")
        assert not ok and "CUDA" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fp8_adamw_triton.available("cpu") == (True, "")
    assert select_backend("triton", torch.device("cpu")).name == "triton"


def test_rejects_bad_entries(interpreter):
    f = get_format("e4m3")
    s = StepScalars.compute(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    st = new_state((6, 48), f, f, 0)
    st["m_meta"] = st["m_meta"][:-1].clone()
    with pytest.raises(ValueError, match="m_meta"):
        fp8_adamw_triton.update(entries([st], [torch.zeros(6, 48)], s, f, f, True))
    st = new_state((6, 48), f, f, 0)
    with pytest.raises(ValueError, match="contiguous"):
        fp8_adamw_triton.update(entries([st], [torch.zeros(48, 6).t()], s, f, f, True))


def train(backend: str, steps: int = 5) -> tuple:
    torch.manual_seed(0)
    # Weights of 8 groups of 8 x 16 and 2 groups of 2 x 64 in FP8, the bias in FP32 (min_fp8_numel).
    model = nn.Sequential(nn.Linear(16, 64, bias=False), nn.Tanh(), nn.Linear(64, 3))
    opt = CoatAdamW(
        model.parameters(), lr=1e-2, weight_decay=0.1, second_moment="e5m2", min_fp8_numel=100, backend=backend
    )
    fit_regression(model, opt, steps, batch=8)
    return model, opt


def test_coat_adamw_triton_backend_matches_torch(interpreter):
    (m_ref, o_ref), (m_tri, o_tri) = (train(b) for b in ("torch", "triton"))
    assert o_tri.backend.name == "triton"
    assert o_tri.state[m_tri[0].weight]["exp_avg_sq"].dtype == torch.float8_e5m2
    for p_ref, p_tri in zip(m_ref.parameters(), m_tri.parameters()):
        assert torch.equal(bits(p_ref.detach()), bits(p_tri.detach()))
        for key, t in o_ref.state[p_ref].items():
            assert torch.equal(bits(t), bits(o_tri.state[p_tri][key])), key
