"""Peak FLOP/s per device for MFU, and memory accounting of the training state."""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING, Dict, Optional

import torch

if TYPE_CHECKING:
    from megaeff.config.optim import OptimConfig

# Dense bf16 tensor-core peak per GPU (vendor datasheets, without sparsity).
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "A6000": 155e12,
    "V100": 125e12,
}


def _cpu_flops_per_cycle() -> int:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return 16
    if "avx512f" in flags:
        return 64  # 2 FMA units x 16 fp32 lanes x 2 flops
    if "avx2" in flags and "fma" in flags:
        return 32
    return 16


def _cpu_ghz() -> float:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000.0
    except OSError:
        pass
    return 2.5


def peak_flops(device: torch.device, override_tflops=None) -> float:
    """Per-device peak. On CPU this is an estimate (threads x clock x SIMD FMA width); pass
    `logging.peak_tflops` for a measured number."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return 312e12
    return torch.get_num_threads() * _cpu_ghz() * 1e9 * _cpu_flops_per_cycle()


def tensor_bytes(tensors) -> int:
    """Bytes actually held. Wrapper subclasses (e.g. torchao's quantized optimizer states) report their logical
    dtype, so count the plain tensors they hold instead."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            total += tensor_bytes(getattr(t, name) for name in t.__tensor_flatten__()[0])
        else:
            total += t.numel() * t.element_size()
    return total


def state_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """Bytes of the training state held now: weights, gradients, optimizer states and integer index buffers
    (SLTrain supports, LOST channel sets and their checksums; regenerated from the seed, never communicated)."""
    from megaeff.layers.grad_accum_fusion import grad_of
    from megaeff.layers.linear import index_buffers

    params = list(model.parameters())
    optim = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "mem_params_bytes": tensor_bytes(params),
        "mem_grads_bytes": tensor_bytes(grad_of(p) for p in params),  # fused weights: their fp32 main_grad
        "mem_optim_bytes": tensor_bytes(optim),
        "mem_index_bytes": tensor_bytes(b for _, b in index_buffers(model)),
    }


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int32": 4, "int64": 8}


def estimate_state_memory(
    model: torch.nn.Module,
    *,
    param_dtype: str = "fp32",
    grad_dtype: Optional[str] = "fp32",
    state_dtype: str = "fp32",
    index_dtype: str = "int32",
    ocfg: Optional[OptimConfig] = None,
) -> Dict[str, int]:
    """Training-state bytes of an AdamW run of `model`, from shapes only (works on the meta device).

    weights: every parameter in `param_dtype`; grads: every trainable one in `grad_dtype` (None: not held, as
    with per-layer optimizer steps); AdamW: exp_avg and exp_avg_sq per trainable element in `state_dtype` plus the
    fp32 step counter torch keeps per parameter tensor; index: the int32 index buffers counted at `index_dtype`
    (int64 is what SLTrain's upstream code stores) plus the 8-byte checksums. With the fp32 defaults the numbers
    equal `state_memory` of a real model after its first optimizer step.

    `ocfg` (OptimConfig) with name=galore: GaLore's state instead (megaeff/optim/galore.py): projected moments and
    the projector bases in `state_dtype`, plain AdamW moments elsewhere, an int64 step per tensor.
    """
    from megaeff.layers.linear import index_buffers

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in trainable)
    index_entries = sum(b.numel() for _, b in index_buffers(model) if b.dtype == torch.int32)
    other_int = sum(b.numel() * b.element_size() for _, b in index_buffers(model) if b.dtype != torch.int32)
    out = {
        "params": n_params,
        "trainable_params": n_train,
        "index_entries": index_entries,
        "mem_params_bytes": n_params * DTYPE_BYTES[param_dtype],
        "mem_grads_bytes": n_train * DTYPE_BYTES[grad_dtype] if grad_dtype else 0,
        "mem_optim_bytes": 2 * n_train * DTYPE_BYTES[state_dtype] + 4 * len(trainable),
        "mem_index_bytes": index_entries * DTYPE_BYTES[index_dtype] + other_int,
    }
    if ocfg is not None and ocfg.name == "galore":
        from megaeff.optim.galore import galore_state_numel

        g = galore_state_numel(model, ocfg.galore_rank, str(ocfg.galore_side), bool(ocfg.galore_cross_head))
        out["mem_optim_bytes"] = (g["moments"] + g["projector"]) * DTYPE_BYTES[state_dtype] + 8 * g["tensors"]
        out["projector_bytes"] = g["projector"] * DTYPE_BYTES[state_dtype]  # part of mem_optim_bytes
    out["mem_total_bytes"] = sum(v for k, v in out.items() if k.startswith("mem_"))
    return out


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the process's resident high-water mark.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 if os.name == "posix" else 0
