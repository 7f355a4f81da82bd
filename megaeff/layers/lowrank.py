"""`lowrank`: W = B A with rank r, the "Low-Rank" baseline of GaLore's Table 2 (and of SLTrain, LOST).

Both factors are trained; there is no dense weight and no scale (W = B A exactly, as the baseline is stated).

Initialization. GaLore never published the code of this baseline; it builds on ReLoRA, whose "lora only" mode
(`keep_original=False`, i.e. no dense weight) initializes *both* factors with kaiming-uniform(a=sqrt(5)), the
nn.Linear default. We do the same, drawn from the layout-independent generators of (seed, name):

    A ~ U(-1/sqrt(in), 1/sqrt(in))     (r x in, fan-in = in)
    B ~ U(-1/sqrt(r),  1/sqrt(r))      (out x r, fan-in = r)

so std(W) = 1/(3 sqrt(in)), e.g. 0.015 at in=512, close to the dense N(0, 0.02). B cannot start at zero here as
it does in LoRA/SLTrain: with A and B both trainable and nothing else in the layer, B = 0 would leave A without a
gradient at step 0. ReLoRA additionally multiplies by lora_alpha/r; whether GaLore kept that factor is unknown,
and under Adam a constant factor on a product of two trained factors only rescales the init and the effective
step, so we leave it out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from megaeff.layers.ops import resolve

if TYPE_CHECKING:
    from megaeff.config.model import MethodConfig


class LowRankLinear(nn.Module):
    method = "lowrank"

    def __init__(self, in_features: int, out_features: int, *, rank: int, name: Optional[str] = None, ops=None):
        super().__init__()
        self.ops = resolve(ops)
        if not 1 <= rank:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank, self.name = in_features, out_features, rank, name
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))

    @classmethod
    def from_config(
        cls, in_features: int, out_features: int, *, name: str, method: MethodConfig, ops=None
    ) -> "LowRankLinear":
        return cls(in_features, out_features, rank=method.rank, name=name, ops=ops)

    def init_weights(self, prefix: str, init) -> None:
        key = self.name or prefix
        init.uniform_(f"{key}.A", self.A, 1.0 / math.sqrt(self.in_features))
        init.uniform_(f"{key}.B", self.B, 1.0 / math.sqrt(self.rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(self.ops.linear(x, self.A), self.B)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense W (for tests and export only; never used by forward)."""
        return self.B @ self.A

    # ------------------------------------------------------------------ accounting and logging
    def summary(self) -> str:
        return f"lowrank r={self.rank}"

    def describe(self, tokens: Optional[int] = None) -> str:
        return f"{self.rank * (self.in_features + self.out_features)} params"

    def macs_per_token(self, tokens: Optional[int] = None) -> float:
        return float(self.rank * (self.in_features + self.out_features))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"
