"""FP8 AdamW kernels (csrc/): nvcc builds every .cu, the C++ kernel and the CUDA kernel match the torch reference
bit for bit (megaeff/kernels/fp8_adamw_ref.py), CoatAdamW gives the same run on the C++ backend as on the torch one.

The reference is the one that ships, unpatched: its square roots are `group_quant.sqrt_rn`, correctly rounded by
construction (tests/unit/test_fp8_group_quant.py checks it exactly), like sqrtf in the C++ kernel and
__fsqrt_rn in the CUDA one. (It used to call torch.sqrt, whose CPU float32 kernel is 1 ulp off for 17% of
inputs in torch 2.13: 5,096 of the 76,800 first-layer weights of `tiny_net` differed between fp8_backend=torch
and cpp after one step, 76,652 after six.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from megaeff.kernels import fp8_adamw_cpp, fp8_adamw_cuda
from megaeff.kernels.fp8_adamw import select_backend
from megaeff.kernels.fp8_adamw_ref import StepScalars, reference_update, row_chunks
from megaeff.optim.coat_adamw import CoatAdamW
from megaeff.precision.fp8 import FORMATS, get_format, to_fp8
from megaeff.precision.group_quant import GroupLayout, _pow, _root, dequantize_groups, quantize_groups
from tests.unit.fp8_adamw_cases import STATE, bits, entries, new_state

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC = shutil.which("nvcc")
STEPS = 22
SHAPES = [(128, 384), (64, 352), (3, 4, 130), (40, 48), (1000,)]


@pytest.fixture(scope="module")
def cpp():
    """The compiled C++ library, once per session (the test session's $MEGAEFF_CACHE is a temporary directory)."""
    lib, reason = fp8_adamw_cpp.library()
    assert lib is not None, reason
    return lib


def ptr(t: torch.Tensor) -> int:
    assert t.is_contiguous()
    return t.data_ptr()


# ----------------------------------------------------------------------------------------------------- nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_nvcc_compiles(source, arch, tmp_path):
    cmd = [NVCC, *fp8_adamw_cuda.NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    cmd += ["-c", str(CSRC / source), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------- pieces of the C++ kernel
def test_library_constants(cpp):
    assert cpp.megaeff_fp8_adamw_desc_size() == 144
    for name, fid in fp8_adamw_cpp.FORMAT_IDS.items():
        assert cpp.megaeff_fp8_log2_target_range(fid) == FORMATS[name].log2_target_range


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_decode_and_encode_match_torch(cpp, fmt):
    f, fid = get_format(fmt), fp8_adamw_cpp.FORMAT_IDS[fmt]
    codes = torch.arange(256, dtype=torch.uint8)
    out = torch.empty(256)
    cpp.megaeff_fp8_decode(ptr(codes), ptr(out), 256, fid)
    ref = codes.view(f.dtype).float()
    nan = torch.isnan(ref)  # NaN payloads may differ
    assert torch.equal(torch.isnan(out), nan) and torch.equal(bits(out[~nan]), bits(ref[~nan]))

    # Every finite value, the midpoints between neighbours and their FP32 neighbours (ties to even), random
    # magnitudes from FP32 subnormals to beyond FMAX (saturation), both signs and both zeros.
    grid = codes.view(f.dtype).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    gen = torch.Generator().manual_seed(0)
    rand = torch.exp2(torch.rand(200_000, generator=gen) * 170 - 150)
    below, above = torch.nextafter(mids, torch.zeros(1)), torch.nextafter(mids, torch.full((1,), 1e9))
    pos = torch.cat([grid, mids, below, above, rand])
    x = torch.cat([pos, -pos, torch.tensor([float("inf"), -float("inf"), 1e38, -1e38])])
    got = torch.empty(x.numel(), dtype=torch.uint8)
    cpp.megaeff_fp8_encode(ptr(x), ptr(got), x.numel(), fid)
    assert torch.equal(got, to_fp8(x, f).view(torch.uint8))


def test_float64_pow_and_root_round_like_torch(cpp):
    """exp2/log2 of the C library and of torch may differ by an ulp in float64; rounded to FP32 they agree."""
    gen = torch.Generator().manual_seed(1)
    n = 1_000_000
    k = torch.randint(16, 32 * 16 + 1, (n,), generator=gen).float() / 16
    k[:1000] = 1.0
    t = torch.exp2(torch.rand(n, generator=gen) * 260 - 130)
    y = torch.exp2(torch.rand(n, generator=gen) * 250 - 148)
    t[:10], y[:10] = 0.0, 0.0
    out = torch.empty(n)
    cpp.megaeff_fp8_pow(ptr(t), ptr(k), ptr(out), n)
    assert torch.equal(bits(out), bits(_pow(t, k)))
    cpp.megaeff_fp8_root(ptr(y), ptr(k), ptr(out), n)
    assert torch.equal(bits(out), bits(_root(y, k)))


def special_groups(width: int, gen: torch.Generator) -> torch.Tensor:
    """Groups the quantizer must special-case or that stress it; padding zeros where narrower than `width`."""
    rows = [
        torch.zeros(width),  # all zero
        torch.full((width,), 0.37) * torch.sign(torch.randn(width, generator=gen)),  # constant magnitude
        torch.where(torch.arange(width) % 2 == 0, 1e-30, 1e3) * torch.sign(torch.randn(width, generator=gen)),
        torch.exp2(torch.rand(width, generator=gen) * 20 - 149),  # FP32 subnormals only
        torch.where(torch.rand(width, generator=gen) < 0.5, 0.0, 1.0) * torch.randn(width, generator=gen),
        torch.full((width,), 1e-45),  # the smallest subnormal: no-expansion scale underflows to 0
        torch.tensor([1e30] + [1e-10] * (width - 1)),  # the ratio overflows to inf (k = 1)
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("expand", [True, False])
def test_quantize_groups_match_reference(cpp, fmt, expand):
    f, fid = get_format(fmt), fp8_adamw_cpp.FORMAT_IDS[fmt]
    gen = torch.Generator().manual_seed(2)
    width, n = 128, 4000
    # Finite groups anywhere in FP32's range with ratios from 1 to 2^133 (every k from 32 down to the clamp at
    # 1), both signs.
    span = torch.rand(n, 1, generator=gen) * 133
    lo = torch.rand(n, 1, generator=gen) * (276 - span) - 149
    x = torch.exp2(lo + span * torch.rand(n, width, generator=gen)) * torch.sign(torch.randn(n, width, generator=gen))
    x = torch.cat([x, special_groups(width, gen)])
    codes = torch.empty(x.shape, dtype=torch.uint8)
    meta = torch.empty(x.shape[0], 3)
    cpp.megaeff_fp8_quantize_groups(ptr(x), x.shape[0], width, fid, int(expand), ptr(codes), ptr(meta))
    ref_codes, ref_meta = quantize_groups(x, f, expand)
    assert torch.equal(codes, ref_codes.view(torch.uint8))
    assert torch.equal(bits(meta), bits(ref_meta))
    back = torch.empty(x.shape)
    cpp.megaeff_fp8_dequantize_groups(ptr(codes), ptr(meta), x.shape[0], width, fid, ptr(back))
    assert torch.equal(bits(back), bits(dequantize_groups(ref_codes, ref_meta)))


# ------------------------------------------------------------------------------------------- the whole update
def gradient(shape, step: int, seed: int) -> torch.Tensor:
    """Gradients spread over ~8 decades, with special groups: all zero (stays zero), constant magnitude (stays
    constant), a 1e-30 / 1e3 mix (k clamps to 1, -0 codes), subnormal second moments, half exact zeros, and a
    group of constant magnitude at this step only."""
    lay = GroupLayout.for_shape(shape)
    gen = torch.Generator().manual_seed(1000 * seed + step)
    fixed = torch.Generator().manual_seed(seed)
    w = lay.group_width
    g = lay.to_groups(torch.randn(shape, generator=gen) * torch.exp2(torch.randn(shape, generator=gen) * 4))
    g[0] = 0.0
    g[1] = 0.37 * torch.sign(torch.randn(w, generator=fixed))
    g[2] = torch.where(torch.arange(w) % 2 == 0, 1e-30, 1e3) * torch.sign(torch.randn(w, generator=gen))
    g[3] = torch.exp(torch.empty(w).uniform_(-50.7, -43.7, generator=gen)) * torch.sign(torch.randn(w, generator=gen))
    g[4] = torch.where(torch.rand(w, generator=gen) < 0.5, 0.0, g[4])
    g[5] = float(torch.rand(1, generator=gen)) * torch.sign(torch.randn(w, generator=gen))
    return lay.from_groups(g).reshape(shape)


def assert_same_state(ref, got, step: int) -> None:
    for i, (a, b) in enumerate(zip(ref, got)):
        for key in STATE:
            x, y = bits(a[key]), bits(b[key].cpu())
            where = f"step {step}, tensor {i} {tuple(a['param'].shape)}"
            assert torch.equal(x, y), f"{where}: {key} differs in {int((x != y).sum())} places"


def run_against_reference(update, device, formats, expand, weight_decay):
    m_fmt, v_fmt = (get_format(f) for f in formats)
    ref = [new_state(shape, m_fmt, v_fmt, seed) for seed, shape in enumerate(SHAPES)]
    got = [{k: t.clone().to(device) for k, t in st.items()} for st in ref]
    for step in range(1, STEPS + 1):
        s = StepScalars.compute(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, step=step)
        grads = [gradient(shape, step, seed) for seed, shape in enumerate(SHAPES)]
        reference_update(entries(ref, grads, s, m_fmt, v_fmt, expand))
        update(entries(got, [g.to(device) for g in grads], s, m_fmt, v_fmt, expand))
        assert_same_state(ref, got, step)


FORMAT_PAIRS = [("e4m3", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e5m2")]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("expand", [True, False])
@pytest.mark.parametrize("formats", FORMAT_PAIRS, ids="-".join)
def test_cpp_update_matches_reference(cpp, formats, expand, weight_decay):
    """The C++ kernel as the optimizer runs it: the fast path (csrc/fp8_adamw_fastmath.h) with its libm fallback,
    22 steps over ~8 decades of gradients, every state byte compared after every step."""
    totals = dict.fromkeys(fp8_adamw_cpp.STAT_NAMES, 0)

    def update(es):
        for name, n in fp8_adamw_cpp.update_with_stats(es).items():
            totals[name] += n

    run_against_reference(update, "cpu", formats, expand, weight_decay)
    if expand:  # the interval check did the work (k > 1 groups), not only the exact path
        assert totals["quant_checked"] > 10_000 and totals["root_checked"] > 10_000, totals


def test_cpp_update_rejects_bad_entries(cpp):
    f = get_format("e4m3")
    st = new_state((40, 48), f, f, 0)
    st["m_meta"] = st["m_meta"][:-1].clone()
    s = StepScalars.compute(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="m_meta"):
        fp8_adamw_cpp.update(entries([st], [torch.zeros(40, 48)], s, f, f, True))


def test_cpp_unavailable_without_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGAEFF_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    ok, reason = fp8_adamw_cpp.available("cpu")
    assert not ok and "no-such-compiler" in reason
    with pytest.raises(RuntimeError, match="not available"):
        select_backend("cpp", torch.device("cpu"))
    assert select_backend("auto", torch.device("cpu")).name == "torch"
    assert not fp8_adamw_cpp.available("meta")[0]


# ---------------------------------------------------------------------------------------------- CoatAdamW
def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 300, bias=False), nn.Tanh(), nn.Linear(300, 64))


def lockstep(backends, steps: int, batch: int = 32, **kw):
    """Train one `tiny_net` per backend on the same data, yielding (models, optimizers) after every step."""
    models = [tiny_net() for _ in backends]
    opts = [CoatAdamW(m.parameters(), lr=1e-2, weight_decay=0.1, backend=b, **kw) for m, b in zip(models, backends)]
    assert [o.backend.name for o in opts] == list(backends)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(batch, 256, generator=gen), torch.randn(batch, 64, generator=gen)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        yield models, opts


@pytest.mark.parametrize("second_moment", ["e4m3", "e5m2"])
def test_coat_adamw_cpp_backend_matches_torch(cpp, second_moment):
    """A training run is bit-identical on fp8_backend=torch and cpp (what `auto` takes on CPU): every weight
    (76,800 + 19,200 FP8-moment weights, 64 FP32-moment biases) and every state tensor, after every step."""
    run = lockstep(("torch", "cpp"), 6, second_moment=second_moment)
    for step, ((m_ref, m_cpp), (o_ref, o_cpp)) in enumerate(run, 1):
        for i, (p_ref, p_cpp) in enumerate(zip(m_ref.parameters(), m_cpp.parameters())):
            a, b = bits(p_ref.detach()), bits(p_cpp.detach())
            assert torch.equal(a, b), f"step {step}, parameter {i}: {int((a != b).sum())} of {a.numel()} weights differ"
            for key, t in o_ref.state[p_ref].items():
                assert torch.equal(bits(t), bits(o_cpp.state[p_cpp][key])), f"step {step}, parameter {i}: {key}"
    assert o_ref.state[m_ref[0].weight]["exp_avg_sq"].dtype == get_format(second_moment).dtype


def test_auto_backend_on_cpu_is_the_cpp_kernel(cpp):
    # Several times faster than the torch reference, bit for bit the same (docs/benchmarks.md); the reference
    # stays the fallback without a compiler (test_cpp_unavailable_without_compiler).
    assert select_backend("auto", torch.device("cpu")).name == "cpp"
    assert select_backend("torch", torch.device("cpu")).name == "torch"


# ------------------------------------------------------------------------------------------------------ CUDA
def test_cuda_backend_reports_why_unavailable():
    ok, reason = fp8_adamw_cuda.available("cpu")
    assert not ok and reason
    if not torch.cuda.is_available():
        ok, reason = fp8_adamw_cuda.available("cuda")
        assert not ok and "CUDA" in reason


@pytest.fixture(scope="module")
def cuda_ext(tmp_path_factory):
    """The installed extension, else a JIT build of csrc/ (needs nvcc); skips without a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        return fp8_adamw_cuda.extension()
    except ImportError:
        pass
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None:
        pytest.skip("the CUDA extension is not built and nvcc is not found")
    major, minor = torch.cuda.get_device_capability()
    return load(
        name="megaeff_fp8_adamw_cuda_test",
        sources=[str(CSRC.parent / s) for s in fp8_adamw_cuda.SOURCES],
        extra_cuda_cflags=[*fp8_adamw_cuda.NVCC_FLAGS, f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
        extra_cflags=["-O3"],
        build_directory=str(tmp_path_factory.mktemp("fp8_adamw_cuda")),
    )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("expand", [True, False])
@pytest.mark.parametrize("formats", FORMAT_PAIRS, ids="-".join)
def test_cuda_update_matches_reference(cuda_ext, formats, expand, weight_decay):
    def update(es):
        fp8_adamw_cuda.update(es, ext=cuda_ext)
        torch.cuda.synchronize()

    run_against_reference(update, "cuda", formats, expand, weight_decay)


@pytest.mark.parametrize("chunk", [1, 300, 1000])
def test_reference_in_row_chunks_is_the_whole_tensor_update(chunk):
    """The reference updates large tensors in chunks of whole row blocks (bounded temporaries). Groups are
    independent, so any chunk size (1: one row block at a time; a chunk ending inside a row block of a narrow
    tensor is rounded to whole blocks) gives the whole-tensor result bit for bit. The tensors here are below
    CHUNK_ELEMENTS, so `reference_update` on the whole entry is the unchunked reference."""

    def chunked(es):
        for e in es:
            for piece in row_chunks(e, chunk):
                reference_update([piece])

    run_against_reference(chunked, "cpu", ("e4m3", "e4m3"), True, 0.1)
    fmt = get_format("e4m3")
    s = StepScalars.compute(1e-2, 0.9, 0.999, 1e-8, 0.0, 1)
    e = entries([new_state((40, 256), fmt, fmt, 0)], [torch.ones(40, 256)], s, fmt, fmt, True)[0]
    pieces = list(row_chunks(e, 256 * 8))
    assert [c.layout.n_rows for c in pieces] == [8] * 5 and sum(c.m_meta.shape[0] for c in pieces) == 80
    assert pieces[1].m_meta.data_ptr() == e.m_meta[16:].data_ptr()  # rows 8..15 -> groups 16..31 (2 per row)
