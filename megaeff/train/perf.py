"""Peak FLOP/s per device for MFU, and memory accounting of the training state."""

from __future__ import annotations

import os
import resource
from typing import Dict

import torch

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
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    params = list(model.parameters())
    optim = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "mem_params_bytes": tensor_bytes(params),
        "mem_grads_bytes": tensor_bytes(p.grad for p in params),
        "mem_optim_bytes": tensor_bytes(optim),
    }


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the process's resident high-water mark.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 if os.name == "posix" else 0
