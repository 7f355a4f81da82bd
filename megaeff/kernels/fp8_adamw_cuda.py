"""CUDA backend of the FP8 AdamW update: the fused multi-tensor kernel of csrc/fp8_adamw.cu, one launch for all
groups of all parameters, through the torch extension `megaeff._fp8_adamw_cuda` (csrc/fp8_adamw_binding.cpp).

setup.py builds the extension when torch has CUDA and nvcc is found (`pip install --no-build-isolation -e .`);
there is no JIT fallback here, so a training run never stalls on a compile (tests JIT-build it themselves).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch

from megaeff.kernels.fp8_adamw_ref import Fp8Entry

EXTENSION = "megaeff._fp8_adamw_cuda"
SOURCES = ("csrc/fp8_adamw_binding.cpp", "csrc/fp8_adamw.cu")  # relative to the repository root
# The contract needs IEEE FP32 arithmetic without contraction and with subnormals (setup.py passes the same).
NVCC_FLAGS = ("-O3", "-std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")
FORMAT_IDS = {"e4m3": 0, "e5m2": 1}  # fp8_adamw.h's MEGAEFF_FP8_*


def extension() -> ModuleType:
    """The compiled extension; ImportError when it was not built."""
    return importlib.import_module(EXTENSION)


def available(device) -> Tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the CUDA kernel updates CUDA tensors, not {device.type} ones"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    try:
        extension()
    except ImportError as exc:
        return False, (
            f"{EXTENSION} is not built ({exc}); build it with `pip install --no-build-isolation -e .` "
            "where torch has CUDA and nvcc is installed"
        )
    return True, ""


def pack(entries: List[Fp8Entry]) -> tuple:
    """The argument lists of the extension's `step` for entries on one device."""
    params, grads, m_codes, m_metas, v_codes, v_metas = [], [], [], [], [], []
    layouts: List[int] = []
    scalars: List[float] = []
    flags: List[int] = []
    for e in entries:
        params.append(e.param)
        grads.append(e.grad)
        m_codes.append(e.m_codes.view(torch.uint8))
        m_metas.append(e.m_meta)
        v_codes.append(e.v_codes.view(torch.uint8))
        v_metas.append(e.v_meta)
        lay, s = e.layout, e.scalars
        layouts += [lay.n_rows, lay.n_cols, lay.rows_per_group, lay.cols_per_group]
        scalars += [
            s.beta1,
            s.one_minus_beta1,
            s.beta2,
            s.one_minus_beta2,
            s.eps,
            s.decay,
            s.step_size,
            s.bias_correction2_sqrt,
        ]
        flags += [FORMAT_IDS[e.m_fmt.name], FORMAT_IDS[e.v_fmt.name], int(e.expand)]
    return params, grads, m_codes, m_metas, v_codes, v_metas, layouts, scalars, flags


def update(entries: List[Fp8Entry], ext: Optional[ModuleType] = None) -> None:
    """In place, like `reference_update`: one launch per device on its current stream. `ext`: an extension
    module to use instead of the installed one (a test's JIT build)."""
    ext = ext or extension()
    by_device: Dict[torch.device, List[Fp8Entry]] = {}
    for e in entries:
        by_device.setdefault(e.param.device, []).append(e)
    for group in by_device.values():
        ext.step(*pack(group))
