"""The one factory every large projection of the model goes through.

`build_linear(in, out, name=..., method=...)` returns the parameterization named by `method.name`:

- `dense`:   y = x W^T (full rank, the baseline);                           megaeff/layers/linear.py
- `lowrank`: W = B A (GaLore's Low-Rank baseline);                          megaeff/layers/lowrank.py
- `sltrain`: W = (alpha/r) B A + S, fixed random support (SLTrain);         megaeff/layers/sltrain.py
- `lost`:    gamma f(x A^T) B^T + (1-gamma) x[:, I] W_s^T, SVD init (LOST); megaeff/layers/lost.py

Every class owns `init_weights(prefix, init)`, where `init` is the `Initializer` of megaeff/models/init.py
(callable as the dense N(0, std) rule, plus `uniform_` and keyed `generator`s), so layout-independent
initialization works for any method. Every class computes through its `ops` (the `act` policy of
megaeff/layers/ops.py), which decides what is saved for backward (FP8 activations) without touching layer code.
`name` is the logical path of the layer (e.g. `layers.3.attention.q`); methods that derive structure from the
seed (sparse supports, channel sets) key it on this name.
Each class also provides `summary()` (the method and its hyperparameters), `describe(tokens)` (per-shape details
such as the compute path chosen) and `macs_per_token(tokens)`, which `describe_method` and the accounting use.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import nn

from megaeff.layers.grad_accum_fusion import dense_wgrad_accum
from megaeff.layers.lost import LostLinear
from megaeff.layers.lowrank import LowRankLinear
from megaeff.layers.ops import ActivationOps, resolve
from megaeff.layers.sltrain import SLTrainLinear

if TYPE_CHECKING:
    from megaeff.config.model import MethodConfig

InitFn = Callable[[str, torch.Tensor], None]  # (logical parameter name, tensor to fill in place)


class DenseLinear(nn.Linear):
    """y = x W^T, no bias (LLaMA has none). `fuse_wgrad` (set by megaeff/layers/grad_accum_fusion.py `enable`):
    W's gradient is accumulated in fp32 `W.main_grad` instead of autograd's `.grad`."""

    method = "dense"
    fuse_wgrad = False

    def __init__(
        self, in_features: int, out_features: int, *, name: Optional[str] = None, device=None, dtype=None, ops=None
    ):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.name = name
        self.ops = resolve(ops)

    @classmethod
    def from_config(
        cls, in_features: int, out_features: int, *, name: str, method: MethodConfig, ops=None
    ) -> "DenseLinear":
        return cls(in_features, out_features, name=name, ops=ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_wgrad:
            return dense_wgrad_accum(x, self.weight)
        return self.ops.dense(x, self.weight)

    def reset_parameters(self) -> None:
        # Weights are filled by the model's layout-independent init, never by nn.Linear's kaiming default.
        pass

    def init_weights(self, prefix: str, normal_: InitFn) -> None:
        normal_(f"{prefix}.weight", self.weight)

    def summary(self) -> str:
        return "dense"

    def describe(self, tokens: Optional[int] = None) -> str:
        return f"{self.in_features * self.out_features} params"

    def macs_per_token(self, tokens: Optional[int] = None) -> float:
        return float(self.in_features * self.out_features)


LINEAR_METHODS: Dict[str, Type[nn.Module]] = {
    "dense": DenseLinear,
    "lowrank": LowRankLinear,
    "sltrain": SLTrainLinear,
    "lost": LostLinear,
}


def build_linear(
    in_features: int, out_features: int, *, name: str, method: MethodConfig, act: Optional[ActivationOps] = None
) -> nn.Module:
    """`name` is the logical path of the layer (e.g. `layers.3.attn.q`); methods that derive structure from the
    seed (sparse supports, channel sets) key it on this name. `act` is the activation policy every matmul and
    non-linearity of the layer goes through (megaeff/layers/ops.py; None: high precision, today's ops)."""
    try:
        cls = LINEAR_METHODS[method.name]
    except KeyError:
        raise ValueError(f"unknown linear method {method.name!r}; available: {', '.join(LINEAR_METHODS)}") from None
    return cls.from_config(in_features, out_features, name=name, method=method, ops=act)


def method_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(module path, layer) of every projection built by the factory, in module order."""
    kinds = tuple(LINEAR_METHODS.values())
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def describe_method(model: nn.Module, tokens: Optional[int] = None) -> str:
    """One line for the run log: the method with its hyperparameters, then per layer shape (out x in) the count
    and the method's details, e.g. SLTrain's compute path. `tokens` = tokens per micro-batch call, when known."""
    layers = method_layers(model)
    if not layers:
        return "no factory-built projections"
    summaries = list(OrderedDict.fromkeys(layer.summary() for _, layer in layers))
    shapes: "OrderedDict[Tuple[str, int, int], List[nn.Module]]" = OrderedDict()
    for _, layer in layers:
        shapes.setdefault((layer.summary(), layer.out_features, layer.in_features), []).append(layer)
    parts = [f"{out}x{inp} x{len(group)}: {group[0].describe(tokens)}" for (_, out, inp), group in shapes.items()]
    return f"{' / '.join(summaries)}; " + "; ".join(parts)


def linear_macs_per_token(model: nn.Module, tokens: Optional[int] = None) -> float:
    """Forward multiply-adds per token of all factory-built projections at `tokens` per call (SLTrain's path
    depends on it); training FLOPs are about 6x this (2 FLOPs per multiply-add, forward + 2x backward)."""
    return sum(layer.macs_per_token(tokens) for _, layer in method_layers(model))


def index_buffers(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """Integer buffers of the model: sparse supports, channel sets and their checksums."""
    return [(n, b) for n, b in model.named_buffers() if not (b.is_floating_point() or b.is_complex())]
