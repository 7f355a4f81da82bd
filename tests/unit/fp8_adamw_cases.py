"""What the FP8 AdamW kernel tests share (C++, CUDA and Triton against the torch reference as shipped, which is
correctly rounded by itself: no patched torch.sqrt): bit views, fresh optimizer states and the entries every
backend takes."""

from __future__ import annotations

from typing import Dict, List

import torch

from megaeff.kernels.fp8_adamw_ref import Fp8Entry, StepScalars
from megaeff.optim.coat_adamw import initial_meta
from megaeff.precision.group_quant import GroupLayout

STATE = ("param", "m_codes", "m_meta", "v_codes", "v_meta")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns of FP8 and FP32 tensors, so that -0.0 != +0.0 (other dtypes as they are)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def new_state(shape, m_fmt, v_fmt, seed: int) -> Dict[str, torch.Tensor]:
    n = GroupLayout.for_shape(shape).n_groups
    return {
        "param": torch.randn(shape, generator=torch.Generator().manual_seed(seed)),
        "m_codes": torch.zeros(shape, dtype=m_fmt.dtype),
        "m_meta": initial_meta(n, "cpu"),
        "v_codes": torch.zeros(shape, dtype=v_fmt.dtype),
        "v_meta": initial_meta(n, "cpu"),
    }


def fit_regression(model, opt, steps: int, batch: int) -> None:
    """`steps` optimizer steps of a squared-error regression on seeded random data (the same for every backend)."""
    n_in, n_out = model[0].in_features, model[-1].out_features
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(batch, n_in, generator=gen), torch.randn(batch, n_out, generator=gen)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def entries(states, grads, s: StepScalars, m_fmt, v_fmt, expand) -> List[Fp8Entry]:
    return [
        Fp8Entry(
            grad=g, layout=GroupLayout.for_shape(g.shape), scalars=s, m_fmt=m_fmt, v_fmt=v_fmt, expand=expand, **st
        )
        for st, g in zip(states, grads)
    ]
