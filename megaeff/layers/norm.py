from __future__ import annotations

import torch
from torch import nn

from megaeff.layers import apex_ops
from megaeff.layers.ops import resolve


class RMSNorm(nn.Module):
    """x / rms(x) * g, computed in fp32 whatever the input dtype (as LLaMA does).

    `ops` (megaeff.layers.ops) decides what is saved for backward; the default is the plain autograd formula."""

    def __init__(self, dim: int, eps: float = 1e-6, *, ops=None):
        super().__init__()
        self.eps = eps
        self.ops = resolve(ops)
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # apex's fused kernel on CUDA where it applies (megaeff/layers/apex_ops.py); None elsewhere.
        fused = apex_ops.fused_rmsnorm(x, self.weight, self.eps, self.ops)
        if fused is not None:
            return fused
        return self.ops.rmsnorm(x, self.weight, self.eps)
