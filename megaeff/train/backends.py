"""The backend report: which optional accelerators this process found and which the run uses, with the reason.

Printed once at start-up and written to `<run_dir>/backends.json` (rank 0). Two steps, so the decision is testable
without the packages: `probe(device)` looks at what is installed (imports, versions, the CUDA device), and
`build_report(usage, found)` is a pure function of that and of what the run chose (`usage_of`). Probing never
compiles anything: the C++ CPU kernel is reported as buildable (sources and a compiler present) unless the run
selected it, which compiled it already.

Entries (docs/gpu.md): flash_attn, apex.fused_rmsnorm, apex.multi_tensor_adam, apex.grad_accum_fusion, triton,
csrc.fp8_adamw_cuda, csrc.fp8_adamw_cpu, torch.compile, fp8_gemm.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch

from megaeff.layers import apex_ops
from megaeff.layers.ops import ActivationOps
from megaeff.optim.builder import resolve_impl, uses_fp8_states

if TYPE_CHECKING:
    from megaeff.config.schema import Config

REPORT_FILE = "backends.json"
# What precision.grad_accum_fusion runs where apex's wgrad GEMM does not (megaeff/layers/grad_accum_fusion.py).
TORCH_WGRAD = "torch fallback: fp32 addmm_ into main_grad"
# _scaled_mm's FP8 GEMMs need Ada (8.9) or Hopper (9.0) tensor cores.
FP8_GEMM_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Found:
    """What is installed: `found`, its version, and why not when it is not."""

    found: bool
    version: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Usage:
    """What the run chose (from its config and the objects it built)."""

    device: str
    attention: str  # the resolved attention backend: flash | sdpa | math
    optim_impl: str  # the resolved AdamW implementation (fused, foreach, single, apex), or "coat"
    fp8_kernel: Optional[str]  # COAT's FP8 AdamW kernel (cuda, triton, cpp, torch); None without FP8 states
    fp8_gemm: bool
    compile: Optional[bool]  # train.compile; None where the config has no such field
    default_activation_ops: bool  # the high-precision policy (an FP8 policy computes RMSNorm itself)
    grad_accum_fusion: bool = False  # precision.grad_accum_fusion


@dataclass(frozen=True)
class BackendEntry:
    name: str
    found: bool
    version: str
    used: bool
    reason: str


@dataclass(frozen=True)
class BackendReport:
    device: str
    torch: str
    entries: Tuple[BackendEntry, ...]

    def entry(self, name: str) -> BackendEntry:
        return next(e for e in self.entries if e.name == name)

    def to_dict(self) -> Dict:
        return {"device": self.device, "torch": self.torch, "backends": [asdict(e) for e in self.entries]}

    def lines(self) -> List[str]:
        out = [f"backends (device {self.device}, torch {self.torch}):"]
        for e in self.entries:
            state = "used" if e.used else ("found, not used" if e.found else "not found")
            version = f" {e.version}" if e.version else ""
            out.append(f"  {e.name}{version}: {state}" + (f" ({e.reason})" if e.reason else ""))
        return out


# ------------------------------------------------------------------------------------------------- probing
def _module_version(module: str, load: bool) -> Found:
    """Installed and its version. `load`: import it (a CUDA machine, where a broken binary build matters); else only
    find it and read its metadata, so that a CPU run does not pay a second of imports for packages it cannot use."""
    if not load:
        if importlib.util.find_spec(module) is None:
            return Found(False, reason=f"{module} is not installed")
        try:
            return Found(True, importlib.metadata.version(module.replace("_", "-")))
        except importlib.metadata.PackageNotFoundError:
            return Found(True, "unknown")
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # a broken binary build raises more than ImportError
        return Found(False, reason=f"{module} is not importable ({type(exc).__name__}: {exc})")
    return Found(True, str(getattr(mod, "__version__", "") or "unknown"))


def _csrc_cuda(device: torch.device) -> Found:
    from megaeff.kernels import fp8_adamw_cuda

    try:
        fp8_adamw_cuda.extension()
    except ImportError as exc:
        return Found(
            False, reason=f"{fp8_adamw_cuda.EXTENSION} is not built ({exc}); pip install --no-build-isolation -e ."
        )
    ok, why = fp8_adamw_cuda.available(device)
    return Found(True, "built", "" if ok else why)


def _csrc_cpu() -> Found:
    from megaeff.kernels import fp8_adamw_cpp

    source = fp8_adamw_cpp.csrc_dir() / fp8_adamw_cpp.SOURCE
    if not source.is_file():
        return Found(False, reason=f"{source} not found (the kernel needs its sources)")
    if fp8_adamw_cpp.compiler() is None:
        return Found(False, reason="no C++ compiler (set CXX, or install c++/g++)")
    return Found(True, "compiled on first use")


def _compile_found() -> Found:
    if not hasattr(torch, "compile") or importlib.util.find_spec("torch._inductor") is None:
        return Found(False, reason=f"torch {torch.__version__} has no torch.compile/inductor")
    return Found(True, torch.__version__)


def _fp8_gemm_found(device: torch.device) -> Found:
    if not hasattr(torch, "_scaled_mm"):
        return Found(False, reason=f"torch {torch.__version__} has no torch._scaled_mm")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return Found(False, reason="torch sees no CUDA device")
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_GEMM_MIN_CAPABILITY:
            return Found(False, reason=f"compute capability {cap[0]}.{cap[1]} < 8.9 (FP8 tensor cores)")
        return Found(True, f"sm_{cap[0]}{cap[1]}")
    return Found(True, "CPU emulation", "torch's CPU _scaled_mm (slow; held to CUDA's rules)")


def probe(device) -> Dict[str, Found]:
    """What this process has, by report entry. Imports the optional packages on CUDA (only looks them up on CPU);
    compiles nothing."""
    device = torch.device(device)
    apex = apex_ops.apex_status()
    found = {"flash_attn": _module_version("flash_attn", device.type == "cuda")}
    for part in apex_ops.PARTS:
        why = apex.reason if not apex.found else apex.parts.get(part, "")
        found[f"apex.{part}"] = Found(apex.has(part), apex.version, why)
    found["triton"] = _module_version("triton", device.type == "cuda")
    found["csrc.fp8_adamw_cuda"] = _csrc_cuda(device)
    found["csrc.fp8_adamw_cpu"] = _csrc_cpu()
    found["torch.compile"] = _compile_found()
    found["fp8_gemm"] = _fp8_gemm_found(device)
    return found


# ------------------------------------------------------------------------------------------------- decisions
def _fp8_kernel_use(u: Usage, kernel: str) -> Tuple[bool, str]:
    if u.fp8_kernel is None:
        return False, "no FP8 optimizer states in this run"
    if u.fp8_kernel == kernel:
        return True, "COAT's FP8 AdamW kernel"
    return False, f"COAT's FP8 AdamW kernel is {u.fp8_kernel} (optim.fp8_backend)"


def _decide(name: str, u: Usage, f: Found) -> Tuple[bool, str]:
    """(used, why) for one entry. Long-ish by nature: one short rule per backend."""
    cuda = u.device.startswith("cuda")
    if name == "flash_attn":
        if u.attention == "flash":
            return True, "model.attention_backend"
        return False, f"attention backend is {u.attention}" + ("" if cuda else " (flash-attn runs on CUDA only)")
    if name == "apex.fused_rmsnorm":
        if not cuda:
            return False, "CUDA only"
        if not u.default_activation_ops:
            return False, "the FP8 activation policy computes RMSNorm itself"
        if u.compile:
            return False, "under train.compile inductor fuses RMSNorm"
        if os.environ.get(apex_ops.DISABLE_ENV, "") not in ("", "0"):
            return False, f"{apex_ops.DISABLE_ENV} is set"
        return True, "RMSNorm forward and backward"
    if name == "apex.multi_tensor_adam":
        if u.optim_impl == "apex":
            return True, "optim.impl=apex"
        return False, f"AdamW implementation is {u.optim_impl} (optim.impl=apex selects apex; docs/gpu.md)"
    if name == "apex.grad_accum_fusion":
        if not u.grad_accum_fusion:
            return False, "precision.grad_accum_fusion=false (it pays with bf16 weights only; docs/gpu.md)"
        if not cuda:
            return False, f"CUDA only; {TORCH_WGRAD}"
        if os.environ.get(apex_ops.DISABLE_ENV, "") not in ("", "0"):
            return False, f"{apex_ops.DISABLE_ENV} is set; {TORCH_WGRAD}"
        return True, "dense weight gradients accumulated into fp32 main_grad (precision.grad_accum_fusion)"
    if name == "triton":
        used, why = _fp8_kernel_use(u, "triton")
        if u.compile and cuda:
            return True, "inductor's generated kernels" + (f"; {why}" if used else "")
        return used, why
    if name == "csrc.fp8_adamw_cuda":
        return _fp8_kernel_use(u, "cuda")
    if name == "csrc.fp8_adamw_cpu":
        return _fp8_kernel_use(u, "cpp")
    if name == "torch.compile":
        if u.compile is None:
            return False, "not requested (this version has no train.compile)"
        return bool(u.compile), "train.compile=true" if u.compile else "not requested (train.compile=false)"
    if name == "fp8_gemm":
        return (True, "precision.fp8_gemm") if u.fp8_gemm else (False, "precision.fp8_gemm=false")
    raise KeyError(f"unknown backend entry {name!r}")


def build_report(u: Usage, found: Dict[str, Found]) -> BackendReport:
    """Pure: the report of a run that chose `u` on a machine that has `found`. A backend not found is never used;
    its reason is then why it is missing."""
    entries = []
    for name, f in found.items():
        used, why = _decide(name, u, f)
        if not f.found:
            used, why = False, f.reason
            if name == "apex.grad_accum_fusion" and u.grad_accum_fusion:
                why = f"{why}; {TORCH_WGRAD}"
        elif f.reason and not used:
            why = f"{why}; {f.reason}"
        entries.append(BackendEntry(name, f.found, f.version, used, why))
    return BackendReport(u.device, torch.__version__, tuple(entries))


def usage_of(cfg: Config, device: torch.device, attention, act_ops: ActivationOps, optimizer) -> Usage:
    """What a run built: its config and the attention backend, activation policy and optimizer objects."""
    fp8_states = uses_fp8_states(cfg.optim, cfg.precision)
    return Usage(
        device=str(device),
        attention=str(getattr(attention, "name", attention)),
        optim_impl="coat" if fp8_states else str(resolve_impl(cfg.optim.impl, torch.device(device))),
        fp8_kernel=optimizer.backend.name if fp8_states else None,
        fp8_gemm=bool(cfg.precision.fp8_gemm),
        compile=getattr(cfg.train, "compile", None),
        default_activation_ops=type(act_ops) is ActivationOps,
        grad_accum_fusion=bool(getattr(cfg.precision, "grad_accum_fusion", False)),
    )


def write_report(report: BackendReport, run_dir: Path) -> Path:
    """`<run_dir>/backends.json`, written whole (a temporary file renamed into place)."""
    path = Path(run_dir) / REPORT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
