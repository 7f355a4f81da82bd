"""Derived bounds for two runs that add the same gradient terms in another order: plain data parallelism against
FSSDP at dp=4 (tests/distributed/test_fssdp.py), where gloo's all-reduce, the reduce-scatter and the embedding's
row exchange each add the ranks' contributions in their own order.

Gradients (first step). Both runs compute the same N terms bit for bit, one per rank and micro-batch (the
parameters are still equal); the reduced gradient is their FP32 sum in some order. Each of the N - 1 additions
rounds a partial sum, at most sum|t_i|, by at most u = 2^-24 of it, so every order lies within
gamma_{N-1} * sum|t_i| of the exact sum, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., eq. 4.4). The bound is per element and holds for any order and any tree; the float64
reference sum adds its own gamma_{N-1} with u = 2^-53.

FP8 moments (COAT). Each step computes m_t = beta * deq(m_{t-1}) + (1 - beta) * x_t (x = g for the first moment,
g^2 for the second; g the clipped gradient) in FP32 and rounds it per group to the nearest code of its grid: the
FP8 values of q = FMAX * (|m| / mx)^k, dequantized through (scale, k, centre) (megaeff/precision/group_quant.py).
The moment lies between the dequantized values of the two codes next to the one it got, so each run's
dequantized moment is within one code gap of its FP32 moment (`code_gap`: the larger distance to a neighbouring
code on that group's grid; rounding to nearest uses at most about half of it, the rest covers the few-ulp FP32
rounding of the update and of (de)quantization). Hence, elementwise, for every step:

    |deq_fs - deq_dp|_t <= gap_dp + gap_fs + beta * |deq_fs - deq_dp|_{t-1} + (1 - beta) * |x_fs - x_dp|_t

The carried term matters: once a group's grid differs between the runs its moments differ by up to a code gap of
that step, which can be many gaps of a later step where the element has shrunk, and beta carries it on.

Parameters (COAT). Each step subtracts delta_t = step_size * m_t / (sqrt(v_t) / bc2 + eps) (weight decay 0, as
here), computed from the FP32 moments of that step, so |p_fs - p_dp| after the steps is at most
sum_t |delta_fs - delta_dp|_t plus the rounding of the subtractions (u |p| each, in each run). delta_t is
recomputed here from each run's recorded state and clipped gradient by the optimizer's own formula
(megaeff/kernels/fp8_adamw_ref.adamw_math), operation for operation, so the bound checks that every shard got
exactly its tensor's update; how far delta_fs and delta_dp are apart is not bounded a priori: a group whose grid
changed at one step moves its next update by up to a code gap of m (measured: parameters 5% of lr apart).

Codes (first step only). There the quantizer's inputs differ only by the summation order (m_{-1} = 0), a few ulps.
k = floor(16 log2(FMAX^2 / 2) / log2(mx / mn)) / 16 is a step function of the group's range, so it is equal in
both runs or, where that quotient lies within those ulps of an integer, one quantum (1/16) apart; then every
code of the group is on another grid and may differ. Where k is equal the grids agree up to ulps (the centre
cancels in q), so an element's code moves only where q sits on a rounding midpoint: by one code at most (its
ordinal, the FP8 values in order). Later steps feed each run its own dequantized moments, up to a code gap
apart, so codes are compared there only through the values above.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from megaeff.kernels.fp8_adamw_ref import StepScalars, adamw_math
from megaeff.precision.fp8 import Fp8Format
from megaeff.precision.group_quant import GroupLayout, dequantize, dequantize_groups

U = 2.0**-24  # unit roundoff of FP32
K_QUANTUM = 1.0 / 16  # COAT's expansion exponents are multiples of 1/16


def summation_bounds(terms: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """name -> (exact float64 sum, bound on |FP32 sum in any order - exact|) of the terms (dicts of FP32 tensors)."""
    n = len(terms) - 1
    out = {}
    for name in terms[0]:
        t = torch.stack([d[name].double() for d in terms])
        gamma = n * U / (1 - n * U) + n * 2.0**-53 / (1 - n * 2.0**-53)
        out[name] = t.sum(0), gamma * t.abs().sum(0)
    return out


def grad_bounds(dp_ranks: Sequence[dict]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """`summation_bounds` of the first step's terms of every rank of a dp group (each run's "terms": a list of
    gradient dicts, one per micro-batch)."""
    return summation_bounds([t for r in dp_ranks for t in r["terms"]])


def assert_summation_order(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    err = (got.double() - exact).abs()
    i = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{what}: |got - exact sum| {err.flatten()[i]:.3g} > {bound.flatten()[i]:.3g} (element {i})"
    )


def ordinal(codes: torch.Tensor) -> torch.Tensor:
    """FP8 bytes -> int32 rank of their value (sign-magnitude bytes: +0 and -0 are both 0)."""
    b = codes.view(torch.uint8).to(torch.int32)
    return torch.where(b >= 128, 128 - b, b)


def code_gap(codes: torch.Tensor, meta: torch.Tensor, layout: GroupLayout, fmt: Fp8Format) -> torch.Tensor:
    """[n_groups, width] float64: the larger distance from each dequantized element to the values of its two
    neighbouring codes on its group's grid (at the largest finite code, the one below)."""
    top = int(ordinal(torch.tensor(fmt.max).to(fmt.dtype)))
    o = ordinal(layout.to_groups(codes.view(torch.uint8)))

    def value(ords):
        return dequantize_groups(torch.where(ords < 0, 128 - ords, ords).to(torch.uint8).view(fmt.dtype), meta).double()

    here = value(o)
    return torch.maximum((value((o + 1).clamp(max=top)) - here).abs(), (value((o - 1).clamp(min=-top)) - here).abs())


def _moment(st: dict, key: str, fmt: Fp8Format) -> Tuple[torch.Tensor, torch.Tensor, GroupLayout]:
    layout = GroupLayout.for_shape(st[key].shape)
    groups = layout.to_groups(st[key])
    return groups, dequantize_groups(groups.view(fmt.dtype), st[key + "_meta"]).double(), layout


def assert_fp8_moments(ref: List[dict], got: List[dict], betas: Sequence[float], formats: Dict[str, Fp8Format]) -> dict:
    """The rules of the module docstring on every FP8 moment of two runs' per-step records
    ({"grads": clipped logical gradients, "ostate": logical optimizer state, codes as bytes}).
    Returns what was measured: groups whose k differs at the first step, codes moved by one step in groups of
    equal k there, and the largest |deq_fs - deq_dp| / bound over all steps."""
    seen = dict(k_changed=0, codes_moved=0, worst=0.0)
    for name, st0 in ref[0]["ostate"].items():
        for key, beta in (("exp_avg", betas[0]), ("exp_avg_sq", betas[1])):
            if st0[key].dtype != torch.uint8:
                continue  # FP32 moments (tensors below min_fp8_numel) are compared as such
            fmt, carried = formats[key], 0.0
            for t, (a, b) in enumerate(zip(ref, got)):
                sa, sb = a["ostate"][name], b["ostate"][name]
                codes_a, deq_a, layout = _moment(sa, key, fmt)
                codes_b, deq_b, _ = _moment(sb, key, fmt)
                ga, gb = a["grads"][name].double(), b["grads"][name].double()
                dx = (gb - ga).abs() if key == "exp_avg" else (gb * gb - ga * ga).abs()
                what = f"{name} {key} step {t + 1}"
                if t == 0:
                    dk = (sb[key + "_meta"][:, 1] - sa[key + "_meta"][:, 1]).abs()
                    assert bool(((dk == 0) | (dk == K_QUANTUM)).all()), f"{what}: k differs by {dk.max().item()}"
                    moved = (ordinal(codes_b) - ordinal(codes_a)).abs()[dk == 0]
                    assert bool((moved <= 1).all()), f"{what}: a code moved by {int(moved.max())} in a group of equal k"
                    seen["k_changed"] += int((dk > 0).sum())
                    seen["codes_moved"] += int((moved > 0).sum())
                err = (deq_b - deq_a).abs()
                bound = code_gap(sa[key], sa[key + "_meta"], layout, fmt) + code_gap(
                    sb[key], sb[key + "_meta"], layout, fmt
                )
                bound = bound + beta * carried + (1 - beta) * layout.to_groups(dx)
                ratio = float((err / bound.clamp_min(1e-300)).max())
                assert bool((err <= bound).all()), f"{what}: dequantized moments differ by {ratio:.3g} x the bound"
                seen["worst"] = max(seen["worst"], ratio)
                carried = err
    return seen


def _moments_before(trace: List[dict], t: int, name: str, formats: Dict[str, Fp8Format], like: torch.Tensor):
    """(m, v) that step t + 1 started from: zeros, the FP32 moments, or the dequantized FP8 ones."""
    if t == 0:
        return torch.zeros_like(like), torch.zeros_like(like)
    st = trace[t - 1]["ostate"][name]
    out = []
    for key in ("exp_avg", "exp_avg_sq"):
        if st[key].dtype == torch.uint8:
            out.append(
                dequantize(st[key].view(formats[key].dtype), st[key + "_meta"], GroupLayout.for_shape(st[key].shape))
            )
        else:
            out.append(st[key])
    return tuple(out)


def assert_coat_params(
    ref: List[dict], got: List[dict], p_ref: dict, p_got: dict, optim, formats: Dict[str, Fp8Format]
) -> float:
    """|p_fs - p_dp| <= sum_t |delta_fs - delta_dp|_t + rounding (module docstring) for every traced parameter,
    `optim` an OptimConfig with weight_decay 0. Returns the largest |p_fs - p_dp| / bound."""
    assert optim.weight_decay == 0
    worst = 0.0
    for name in ref[0]["ostate"]:
        moved = magnitude = 0.0
        for t in range(len(ref)):
            s = StepScalars.compute(optim.lr, optim.betas[0], optim.betas[1], optim.eps, 0.0, t + 1)
            delta = []
            for trace in (ref, got):
                g = trace[t]["grads"][name]
                # From p = 0: exactly -delta_t, by the step's own FP32 operations (0 * decay = 0, 0 - d = -d).
                delta.append(
                    adamw_math(torch.zeros_like(g), *_moments_before(trace, t, name, formats, g), g, s)[0].double()
                )
            moved = moved + (delta[1] - delta[0]).abs()
            magnitude = magnitude + torch.maximum(delta[0].abs(), delta[1].abs())
        a, b = p_ref[name].double(), p_got[name].double()
        bound = moved + 2 * len(ref) * U * (torch.maximum(a.abs(), b.abs()) + magnitude)
        err = (b - a).abs()
        worst = max(worst, float((err / bound.clamp_min(1e-300)).max()))
        assert bool((err <= bound).all()), f"{name}: parameters differ by {worst:.3g} x the bound"
    return worst
