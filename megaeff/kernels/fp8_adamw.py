"""Backends of the FP8 AdamW update, one contract (megaeff/kernels/fp8_adamw_ref.py), and the dispatcher.

Preference on CUDA: the csrc extension (multi-tensor, one launch for all groups of all parameters) > Triton >
the torch reference. On CPU: the torch reference, then the C++ kernel (OpenMP, compiled on first use): the
contract's float64 exp2/log2 per element dominate both, and torch's vectorized ones are as fast as the C++
loop (docs/benchmarks.md: 119 vs 144 ms per llama_20m update on one thread, 78 vs 74 on two), so the C++ kernel
is kept as an exact, selectable alternative (`fp8_backend=cpp`), not the default. Asking for a backend that is
not available is an error that says why; `auto` falls back and the run log names the choice.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

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
        return (mod.update, "") if ok else (None, reason)

    return probe


PROBES: Dict[str, Callable[[torch.device], Tuple[Optional[UpdateFn], str]]] = {
    "cuda": _module_backend("megaeff.kernels.fp8_adamw_cuda"),
    "triton": _module_backend("megaeff.kernels.fp8_adamw_triton"),
    "cpp": _module_backend("megaeff.kernels.fp8_adamw_cpp"),
    "torch": _torch_backend,
}
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch", "cpp")}


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
