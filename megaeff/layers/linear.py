"""The one factory every large projection of the model goes through.

`build_linear(in, out, name=..., method=...)` returns the parameterization named by `method.name`. Only
`dense` exists in this build; the sparse-plus-low-rank methods register themselves in `LINEAR_METHODS`.
Each class owns `init_weights(init_fn)`, so layout-independent initialization works for any method.
"""

from __future__ import annotations

from typing import Callable, Dict, Type

import torch
from torch import nn

InitFn = Callable[[str, torch.Tensor], None]  # (logical parameter name, tensor to fill in place)


class DenseLinear(nn.Linear):
    """y = x W^T, no bias (LLaMA has none)."""

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        # Weights are filled by the model's layout-independent init, never by nn.Linear's kaiming default.
        pass

    def init_weights(self, prefix: str, normal_: InitFn) -> None:
        normal_(f"{prefix}.weight", self.weight)


LINEAR_METHODS: Dict[str, Type[nn.Module]] = {"dense": DenseLinear}


def build_linear(in_features: int, out_features: int, *, name: str, method) -> nn.Module:
    """`name` is the logical path of the layer (e.g. `layers.3.attn.q`); methods that derive structure from the
    seed (sparse supports, channel sets) key it on this name."""
    try:
        cls = LINEAR_METHODS[method.name]
    except KeyError:
        raise ValueError(f"unknown linear method {method.name!r}; available: {', '.join(LINEAR_METHODS)}") from None
    return cls(in_features, out_features)
