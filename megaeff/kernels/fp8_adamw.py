"""Backends of the FP8 AdamW update, one contract (megaeff/kernels/fp8_adamw_ref.py), and the dispatcher.

Preference on CUDA: the csrc extension (multi-tensor, one launch for all groups of all parameters) > Triton >
the torch reference. On CPU: the C++ kernel (OpenMP, compiled on first use), then the torch reference, which
`auto` takes only where no C++ compiler is found. The contract's float64 exp2/log2 per element dominate the
reference; the C++ kernel replaces them with vectorized polynomials wherever an interval check proves the result
the exact one (csrc/fp8_adamw_fastmath.h) and runs libm elsewhere, so it stays bit for bit the reference at
several times its speed, on par with torchao's AdamWFp8 (docs/benchmarks.md, "FP8 AdamW on CPU"). Asking for a
backend that is not available is an error that says why; `auto` falls back and the run log names the choice.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import FakeTensor

from megaeff.errors import ConfigError
from megaeff.kernels.fp8_adamw_ref import Fp8Entry, reference_update

UpdateFn = Callable[[List[Fp8Entry]], None]


@dataclass(frozen=True)
class Backend:
    name: str
    update: UpdateFn


def _torch_backend(device: torch.device) -> Tuple[Optional[UpdateFn], str]:
    return reference_update, ""


def _module_backend(module: str) -> Callable[[torch.device], Tuple[Optional[UpdateFn], str]]:
    """A backend module exposes `available(device) -> (bool, reason)` and `update(entries)`."""

    def probe(device: torch.device) -> Tuple[Optional[UpdateFn], str]:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            return None, f"{module} cannot be imported: {exc}"
        ok, reason = mod.available(device)
        return (_with_storage_free_fallback(mod.update), "") if ok else (None, reason)

    return probe


def _with_storage_free_fallback(kernel: UpdateFn) -> UpdateFn:
    """The kernels work on data pointers, which fake and meta tensors lack (the memory tracker's step runs on
    fake tensors): those updates go through the reference's torch ops, whose results nobody reads."""

    def update(entries: List[Fp8Entry]) -> None:
        if entries and (entries[0].param.is_meta or isinstance(entries[0].param, FakeTensor)):
            reference_update(entries)
        else:
            kernel(entries)

    return update


PROBES: Dict[str, Callable[[torch.device], Tuple[Optional[UpdateFn], str]]] = {
    "cuda": _module_backend("megaeff.kernels.fp8_adamw_cuda"),
    "triton": _module_backend("megaeff.kernels.fp8_adamw_triton"),
    "cpp": _module_backend("megaeff.kernels.fp8_adamw_cpp"),
    "torch": _torch_backend,
}
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailable(ConfigError, RuntimeError):
    """A backend the config asks for and this machine lacks: one `megaeff: error:` line from the CLI (ConfigError),
    and still the RuntimeError callers of `select_backend` catch."""


def select_backend(requested: str, device: torch.device) -> Backend:
    device = torch.device(device)
    if requested != "auto":
        if requested not in PROBES:
            raise ValueError(f"unknown FP8 AdamW backend {requested!r}; available: auto, {', '.join(PROBES)}")
        fn, reason = PROBES[requested](device)
        if fn is None:
            raise BackendUnavailable(
                "optim.fp8_backend",
                f"FP8 AdamW backend {requested!r} is not available on {device}: {reason}; "
                "optim.fp8_backend=auto picks the best available one",
            )
        return Backend(requested, fn)
    for name in PREFERENCE.get(device.type, ("torch",)):
        fn, _ = PROBES[name](device)
        if fn is not None:
            return Backend(name, fn)
    return Backend("torch", reference_update)
