"""CPU backend of the FP8 AdamW update: csrc/fp8_adamw_cpu.cpp (C++17, OpenMP), compiled on first use, via ctypes.

The shared object lives in $MEGAEFF_CACHE/kernels (default ~/.cache/megaeff/kernels), named by a hash of the
sources, the flags and the platform, so a source change recompiles and ranks sharing the cache reuse one build.
Each rank compiles to a private temporary name and renames it into place: the rename is atomic, so concurrent
ranks never load a half-written file (at worst they compile the same bytes twice).

No -march=native: the cache may be shared by nodes of different CPUs; the loops of the fast path
(fp8_adamw_fastmath.h: polynomial log2/exp2, kept only where provably equal to the exact libm result) are
compiled for AVX2 and the baseline with target_clones, plus an AVX2+FMA build, picked at run time. The fused
multiply-adds are explicit and only in those polynomials: -ffp-contract=off and no fast-math keep every
operation of the contract its IEEE one (fp8_adamw_math.h); -fno-math-errno and -fno-trapping-math change no
value (no errno, no FP traps observed) but let GCC if-convert and vectorize.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megaeff.kernels.fp8_adamw_ref import Fp8Entry

FLAGS = (
    "-std=c++17",
    "-O3",
    "-fopenmp",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-shared",
    "-fPIC",
)
SOURCE = "fp8_adamw_cpu.cpp"
HEADERS = ("fp8_adamw.h", "fp8_adamw_math.h", "fp8_adamw_fastmath.h")
# megaeff_fp8_adamw_step_cpu_ex's counters: quantized elements that took the fast path's interval check, those of
# them that fell back to libm, dequantized (distinct per group) codes that took it, those that fell back.
STAT_NAMES = ("quant_checked", "quant_fallback", "root_checked", "root_fallback")
FORMAT_IDS = {"e4m3": 0, "e5m2": 1}  # fp8_adamw.h's MEGAEFF_FP8_*
COMPILE_TIMEOUT_S = 300


class Desc(ctypes.Structure):
    """Mirror of MegaeffFp8AdamwDesc in csrc/fp8_adamw.h (checked against the library's sizeof on load)."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("m_codes", ctypes.c_void_p),
        ("m_meta", ctypes.c_void_p),
        ("v_codes", ctypes.c_void_p),
        ("v_meta", ctypes.c_void_p),
        ("n_rows", ctypes.c_int64),
        ("n_cols", ctypes.c_int64),
        ("rows_per_group", ctypes.c_int64),
        ("cols_per_group", ctypes.c_int64),
        ("groups_per_row", ctypes.c_int64),
        ("group_offset", ctypes.c_int64),
        ("beta1", ctypes.c_float),
        ("one_minus_beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("one_minus_beta2", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("decay", ctypes.c_float),
        ("step_size", ctypes.c_float),
        ("bias_correction2_sqrt", ctypes.c_float),
        ("m_format", ctypes.c_int32),
        ("v_format", ctypes.c_int32),
        ("expand", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


def csrc_dir() -> Path:
    """`csrc/` of a source checkout, else the copy a non-editable install ships as `megaeff/_csrc`."""
    pkg = Path(__file__).resolve().parents[1]
    for candidate in (pkg.parent / "csrc", pkg / "_csrc"):
        if (candidate / SOURCE).is_file():
            return candidate
    return pkg.parent / "csrc"


def cache_dir() -> Path:
    return Path(os.environ.get("MEGAEFF_CACHE") or Path.home() / ".cache" / "megaeff") / "kernels"


def compiler() -> Optional[List[str]]:
    """$CXX (may carry arguments, e.g. "ccache g++"), else c++ or g++ on PATH."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("c++") or shutil.which("g++")
    return [found] if found else None


def library() -> Tuple[Optional[ctypes.CDLL], str]:
    """(the loaded library, "") or (None, why not); compiles on the first call for a given cache directory."""
    return _load(str(cache_dir()))


@functools.lru_cache(maxsize=None)
def _load(cache: str) -> Tuple[Optional[ctypes.CDLL], str]:
    src = csrc_dir()
    files = [src / SOURCE, *(src / h for h in HEADERS)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        return None, f"C++ sources not found: {', '.join(missing)} (the kernel needs a source checkout)"
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in files), " ".join(FLAGS).encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    target = Path(cache) / f"fp8_adamw_cpu-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        problem = _compile(src / SOURCE, target)
        if problem:
            return None, problem
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"cannot load {target}: {exc}"
    _declare(lib)
    size = lib.megaeff_fp8_adamw_desc_size()
    if size != ctypes.sizeof(Desc):
        return None, f"{target}: descriptor is {size} bytes, the ctypes mirror {ctypes.sizeof(Desc)}"
    return lib, ""


def _compile(source: Path, target: Path) -> str:
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler (set CXX, or install c++/g++)"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [*cxx, *FLAGS, "-o", tmp, str(source)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
        )
        if proc.returncode != 0:
            return f"{' '.join(cxx)} failed on {source}:\n{proc.stderr[-2000:]}"
        os.replace(tmp, target)
        return ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(cxx)} could not compile {source}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.megaeff_fp8_adamw_step_cpu.argtypes = [ctypes.POINTER(Desc), i32, i64, i32]
    lib.megaeff_fp8_adamw_step_cpu.restype = i32
    lib.megaeff_fp8_adamw_step_cpu_ex.argtypes = [ctypes.POINTER(Desc), i32, i64, i32, i32, dbl, dbl, p]
    lib.megaeff_fp8_adamw_step_cpu_ex.restype = i32
    lib.megaeff_fp8_fast_error.argtypes = [p, p, i64, p]
    lib.megaeff_fp8_fast_error.restype = None
    lib.megaeff_fp8_fast_bounds.argtypes = [p]
    lib.megaeff_fp8_fast_bounds.restype = None
    lib.megaeff_fp8_adamw_desc_size.argtypes = []
    lib.megaeff_fp8_adamw_desc_size.restype = i64
    lib.megaeff_fp8_log2_target_range.argtypes = [i32]
    lib.megaeff_fp8_log2_target_range.restype = ctypes.c_double
    for name in ("megaeff_fp8_encode", "megaeff_fp8_decode"):
        getattr(lib, name).argtypes = [p, p, i64, i32]
        getattr(lib, name).restype = None
    for name in ("megaeff_fp8_pow", "megaeff_fp8_root"):
        getattr(lib, name).argtypes = [p, p, p, i64]
        getattr(lib, name).restype = None
    lib.megaeff_fp8_quantize_groups.argtypes = [p, i64, i64, i32, i32, p, p]
    lib.megaeff_fp8_quantize_groups.restype = None
    lib.megaeff_fp8_dequantize_groups.argtypes = [p, p, i64, i64, i32, p]
    lib.megaeff_fp8_dequantize_groups.restype = None


def available(device) -> Tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the C++ kernel updates CPU tensors, not {device.type} ones"
    lib, reason = library()
    return lib is not None, reason


def _check(i: int, e: Fp8Entry) -> None:
    lay = e.layout
    n = lay.n_rows * lay.n_cols
    tensors = {"param": e.param, "grad": e.grad, "m_codes": e.m_codes, "v_codes": e.v_codes}
    for name, t in {**tensors, "m_meta": e.m_meta, "v_meta": e.v_meta}.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"entry {i}: {name} must be a contiguous CPU tensor")
    for name, t in tensors.items():
        if t.numel() != n:
            raise ValueError(f"entry {i}: {name} has {t.numel()} elements, the layout {n}")
    for name in ("param", "grad", "m_meta", "v_meta"):
        if getattr(e, name).dtype != torch.float32:
            raise ValueError(f"entry {i}: {name} must be float32, got {getattr(e, name).dtype}")
    for name, fmt in (("m_codes", e.m_fmt), ("v_codes", e.v_fmt)):
        if getattr(e, name).dtype != fmt.dtype:
            raise ValueError(f"entry {i}: {name} is {getattr(e, name).dtype}, the format {fmt.name} needs {fmt.dtype}")
    for name in ("m_meta", "v_meta"):
        if tuple(getattr(e, name).shape) != (lay.n_groups, 3):
            raise ValueError(f"entry {i}: {name} is {tuple(getattr(e, name).shape)}, expected ({lay.n_groups}, 3)")


def descriptors(entries: List[Fp8Entry]) -> Tuple[ctypes.Array, int]:
    """The descriptor array of `entries` and the total number of groups."""
    descs = (Desc * len(entries))()
    offset = 0
    for i, (d, e) in enumerate(zip(descs, entries)):
        _check(i, e)
        lay, s = e.layout, e.scalars
        d.param, d.grad = e.param.data_ptr(), e.grad.data_ptr()
        d.m_codes, d.m_meta = e.m_codes.data_ptr(), e.m_meta.data_ptr()
        d.v_codes, d.v_meta = e.v_codes.data_ptr(), e.v_meta.data_ptr()
        d.n_rows, d.n_cols = lay.n_rows, lay.n_cols
        d.rows_per_group, d.cols_per_group = lay.rows_per_group, lay.cols_per_group
        d.groups_per_row, d.group_offset = lay.groups_per_row, offset
        d.beta1, d.one_minus_beta1 = s.beta1, s.one_minus_beta1
        d.beta2, d.one_minus_beta2 = s.beta2, s.one_minus_beta2
        d.eps, d.decay, d.step_size = s.eps, s.decay, s.step_size
        d.bias_correction2_sqrt = s.bias_correction2_sqrt
        d.m_format, d.v_format = FORMAT_IDS[e.m_fmt.name], FORMAT_IDS[e.v_fmt.name]
        d.expand, d.reserved = int(e.expand), 0
        offset += lay.n_groups
    return descs, offset


def update(entries: List[Fp8Entry]) -> None:
    """In place, like `reference_update`; one call for all entries, OpenMP with torch's intra-op thread count."""
    update_with_stats(entries)


def update_with_stats(
    entries: List[Fp8Entry], fast: bool = True, e_scale: float = 1.0, perturb: float = 0.0
) -> Dict[str, int]:
    """`update`, returning the fast path's counters (STAT_NAMES). fast=False runs the exact libm path only;
    e_scale (scales the fast path's error bound E) and perturb (a relative error added to its approximations)
    are test hooks that break the proof on purpose: the defaults are the kernel the optimizer runs."""
    stats = {name: 0 for name in STAT_NAMES}
    if not entries:
        return stats
    lib = _library_or_raise()
    descs, total = descriptors(entries)
    out = (ctypes.c_int64 * len(STAT_NAMES))()
    rc = lib.megaeff_fp8_adamw_step_cpu_ex(
        descs, len(entries), total, torch.get_num_threads(), int(fast), e_scale, perturb, out
    )
    if rc != 0:
        raise ValueError("megaeff_fp8_adamw_step_cpu rejected the descriptors (format or layout)")
    return dict(zip(STAT_NAMES, out))


def fast_error(t: torch.Tensor, k: torch.Tensor) -> Tuple[float, float]:
    """The fast path's pow t^k (FP32) and root t^(1/k) (float64) against libm's float64 results, over FP32 t > 0
    (normal) and k > 1 with |k log2 t| <= 32: (largest relative error of the pow as a fraction of its per-element
    bound, largest relative error of the root). fp8_adamw_fastmath.h derives the bounds."""
    lib = _library_or_raise()
    t, k = t.float().contiguous(), k.float().contiguous()
    out = (ctypes.c_double * 2)()
    lib.megaeff_fp8_fast_error(t.data_ptr(), k.data_ptr(), t.numel(), out)
    return out[0], out[1]


def fast_bounds() -> Tuple[float, float]:
    """The error bounds E the fast path assumes: (quantize's power at k = 1, z = 0, its smallest; dequantize's
    root)."""
    out = (ctypes.c_double * 2)()
    _library_or_raise().megaeff_fp8_fast_bounds(out)
    return out[0], out[1]


def _library_or_raise() -> ctypes.CDLL:
    lib, reason = library()
    if lib is None:
        raise RuntimeError(f"the C++ FP8 AdamW kernel is not available: {reason}")
    return lib
