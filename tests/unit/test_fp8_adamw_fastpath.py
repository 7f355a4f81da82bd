"""The C++ FP8 AdamW kernel's fast path (csrc/fp8_adamw_fastmath.h): polynomial log2/exp2 kept only where an
interval check proves the result equal to the exact libm one, else the exact path ("fallback").

What is shown here, bit for bit against the torch reference (megaeff/kernels/fp8_adamw_ref.py):
- the polynomials are far inside the error bounds E the interval check assumes (measured against libm);
- inputs built to land inside E of an FP8 or FP32 rounding boundary take the fallback (counted) and still match;
- the comparison has teeth: an approximation worse than E (the perturb hook) is caught, and the same bad
  approximation with an E that covers it matches again, through the fallback;
- random states over many magnitudes, every format and expansion setting, over several steps: see
  tests/unit/test_fp8_adamw_kernels.py::test_cpp_update_matches_reference, which runs this kernel.
"""

from __future__ import annotations

import math

import pytest
import torch

from megaeff.kernels import fp8_adamw_cpp
from megaeff.kernels.fp8_adamw_ref import StepScalars, reference_update
from megaeff.precision.fp8 import get_format
from megaeff.precision.group_quant import GroupLayout, quantize_groups
from tests.unit.fp8_adamw_cases import STATE, bits, entries, new_state


@pytest.fixture(scope="module")
def cpp():
    lib, reason = fp8_adamw_cpp.library()
    assert lib is not None, reason
    return lib


def run_both(states, grads, s, fmt, **hooks):
    """One step of the reference and of the C++ kernel (with the test hooks) on copies of `states`. Returns
    (number of differing state elements, the kernel's counters)."""
    ref = [{k: t.clone() for k, t in st.items()} for st in states]
    got = [{k: t.clone() for k, t in st.items()} for st in states]
    reference_update(entries(ref, grads, s, fmt, fmt, True))
    stats = fp8_adamw_cpp.update_with_stats(entries(got, grads, s, fmt, fmt, True), **hooks)
    diff = sum(int((bits(a[k]) != bits(b[k])).sum()) for a, b in zip(ref, got) for k in STATE)
    return diff, stats


def test_polynomials_are_well_inside_the_bounds(cpp):
    """The measured error of the fast pow (FP32, as a fraction of its per-element bound pow_bound(k, z)) and root
    (float64) against libm's float64 results, over every k the expansion can produce (multiples of 1/16 in
    (1, 32]) and FP32 t with |k log2 t| <= 30 (the power's guard is 32; the root's t spans 2^-30 to 2^30).
    fp8_adamw_fastmath.h derives at most 1/3 of the bound for the power, and < 2^-43.5 for the root, whose E is
    2^-36 and must also cover libm's own error (< 2^-42.9); measured: about 0.08 and 2^-46."""
    gen = torch.Generator().manual_seed(0)
    k = (torch.randint(17, 513, (200_000,), generator=gen) / 16.0).float()
    log2_t = (torch.rand(200_000, generator=gen, dtype=torch.float64) * 2 - 1) * (30.0 / k.double())
    pow_ratio, root_err = fp8_adamw_cpp.fast_error(torch.exp2(log2_t).float(), k)
    _, e_root = fp8_adamw_cpp.fast_bounds()
    assert 0 < pow_ratio < 1 / 3, pow_ratio
    assert 0 < root_err < e_root / 64, (root_err, e_root)


def midpoint_groups(fmt, k_target: float):
    """Gradients whose first moments (beta1 = 0: m = g exactly) quantize to values within ~2^-23 of FP8 rounding
    midpoints, for a group whose expansion exponent is k_target: the interval check (>= 2^-18 wide) cannot
    decide those, so they fall back. Element 0 is the group maximum 1, element 1 the minimum that gives k."""
    log2_ratio = 16 * fmt.log2_target_range / (16 * k_target + 0.5)  # floor(16 T / log2 R) / 16 == k_target
    mn = torch.tensor(2.0**-log2_ratio).float()
    _, meta = quantize_groups(torch.tensor([[1.0, float(mn)]]), fmt, True)
    scale, k, centre = (float(x) for x in meta[0])
    assert k == k_target
    codes = torch.arange(1, 127, dtype=torch.uint8)  # positive codes of both formats, below the maximum
    values = codes.view(fmt.dtype).double()
    mids = (values[:-1] + values[1:]) / 2
    x = centre * (mids * scale) ** (1.0 / k)
    x = x[(x > float(mn)) & (x < 1.0)].float()
    x = torch.cat([x, torch.nextafter(x, torch.zeros_like(x)), torch.nextafter(x, torch.ones_like(x))])
    rows = []
    for i in range(0, len(x), 126):
        chunk = x[i : i + 126]
        row = torch.cat([torch.tensor([1.0, float(mn)]), chunk, torch.full((126 - len(chunk),), 0.5)])
        rows.append(row * torch.where(torch.arange(128) % 3 == 0, -1.0, 1.0))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_quantize_near_fp8_midpoints_falls_back_and_matches(cpp, name):
    fmt = get_format(name)
    g = midpoint_groups(fmt, 1.0625)
    s = StepScalars.compute(lr=1e-3, beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0, step=1)
    states = [new_state(tuple(g.shape), fmt, fmt, 0)]
    diff, stats = run_both(states, [g], s, fmt)
    assert diff == 0
    assert stats["quant_fallback"] > 50, stats
    # Without the interval (E = 0) the fast path's single rounding of P / scale is not the exact pipeline's
    # two FP32 roundings: on these inputs the codes then differ, so the comparison would catch a too small E.
    diff, stats = run_both(states, [g], s, fmt, e_scale=0.0)
    assert diff > 0 and stats["quant_fallback"] == 0, (diff, stats)


def root_midpoint_state(fmt):
    """States whose dequantized moments need roots within 2^-45 of FP32 rounding midpoints: k = 2 and
    scale = 1 + j 2^-23 (j odd), codes 4^i, so y = 4^i (1 + j 2^-23) and sqrt(y) = 2^i (1 + j 2^-24 - O(2^-49))."""
    shape = (4, 128)
    st = new_state(shape, fmt, fmt, 3)
    powers = torch.tensor([4.0**i for i in range(-3, 4)])
    powers = powers[powers <= fmt.max]
    vals = powers.repeat(128 // len(powers) + 1)[:128] * torch.where(torch.arange(128) % 2 == 0, 1.0, -1.0)
    codes = vals.to(fmt.dtype).repeat(4, 1)
    for key in ("m", "v"):
        st[f"{key}_codes"] = codes.clone() if key == "m" else codes.abs().clone()
        st[f"{key}_meta"] = torch.tensor([[1.0 + j * 2.0**-23, 2.0, 1.0] for j in (1, 3, 5, 7)]).float()
    return st


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_dequantize_near_f32_midpoints_falls_back_and_matches(cpp, name):
    fmt = get_format(name)
    st = root_midpoint_state(fmt)
    g = torch.randn(4, 128, generator=torch.Generator().manual_seed(5)) * 1e-3
    s = StepScalars.compute(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=2)
    diff, stats = run_both([st], [g], s, fmt)
    assert diff == 0
    assert stats["root_fallback"] >= 512, stats  # every element of both moments (4 groups x 128)


def test_an_approximation_worse_than_e_is_caught_and_a_wider_e_repairs_it(cpp):
    """perturb multiplies every fast pow and root by 1 + 2^-20, far outside the root's bound (2^-36): the roots
    then round differently and the bit comparison fails. With E scaled to cover it (2^16: E_root = 2^-20), the
    interval check sends every such element to the exact path and the result matches again."""
    fmt = get_format("e4m3")
    shape = (64, 256)
    gen = torch.Generator().manual_seed(7)
    states = [new_state(shape, fmt, fmt, 1)]
    for step in range(1, 4):  # fill the moments (the kernel matches the reference here: other tests)
        s = StepScalars.compute(1e-3, 0.9, 0.999, 1e-8, 0.0, step)
        g = torch.randn(shape, generator=gen) * torch.exp2(torch.randn(shape, generator=gen) * 3)
        fp8_adamw_cpp.update(entries(states, [g], s, fmt, fmt, True))
    s = StepScalars.compute(1e-3, 0.9, 0.999, 1e-8, 0.0, 4)
    diff, stats = run_both(states, [g], s, fmt, perturb=2.0**-20)
    assert diff > 100, (diff, stats)  # hundreds: the moments barely move the parameters at lr 1e-3
    diff, stats = run_both(states, [g], s, fmt, perturb=2.0**-20, e_scale=2.0**16)
    assert diff == 0
    assert stats["root_fallback"] > stats["root_checked"] // 2, stats
    diff, stats = run_both(states, [g], s, fmt)
    assert diff == 0 and stats["root_checked"] > 0 and stats["quant_checked"] > 0, stats


def test_exact_path_alone_matches_too(cpp):
    """fast=False (the libm path only) is the contract as well, and takes no interval check."""
    fmt = get_format("e5m2")
    shape = (8, 300)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 1e-2
    s = StepScalars.compute(1e-3, 0.9, 0.999, 1e-8, 0.1, 1)
    diff, stats = run_both([new_state(shape, fmt, fmt, 4)], [g], s, fmt, fast=False)
    assert diff == 0 and not any(stats.values())
    assert GroupLayout.for_shape(shape).n_groups == 24 and math.isfinite(s.step_size)
