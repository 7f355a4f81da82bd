"""`train.compile=true`: each transformer block's forward compiled by torch.compile (inductor), in place.

What is compiled, and why there. The block's *forward* is replaced on the instance (`block.forward`), not the
module wrapped or `Module.compile`d, so that:
- parameter and module names do not change (no `_orig_mod.` prefix): checkpoints, the layout-independent init
  and `ParamMeta` records see the same model;
- forward hooks stay outside the compiled code (FSSDP's gathers and DP's gradient hooks are eager Python);
- activation checkpointing, which comes next in `parallelize`'s order, wraps the compiled forward and replays it.
The embedding, the final norm and the fused head + loss (megaeff/layers/head_loss.py) stay eager: the head is
three large GEMMs, which inductor would call as they are.

Compilation is lazy: the first call of each input signature (training, evaluation under no_grad, another batch
shape) compiles, later ones reuse the graph; blocks of one model share their graphs (parameters are graph inputs).
The fake-tensor memory tracker (megaeff/train/memory/) runs the eager forward: `CompiledForward` calls it when
the inputs are fake tensors, so the tracker reports the eager step's bytes.

Layouts it is refused with (megaeff/config/train.py `validate_compile`): tensor, context and pipeline
parallelism and FSSDP put collectives or parameter swaps inside or around the blocks that this build does not
trace or test; MoE routes by data-dependent shapes; COAT's FP8 activations pack saved tensors in custom Functions.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor


class CompiledForward:
    """A block's forward, compiled; eager on fake tensors (the memory tracker)."""

    def __init__(self, forward: Callable, **options):
        self.eager = forward
        self.compiled = torch.compile(forward, **options)

    def __call__(self, x, *args, **kwargs):
        if isinstance(x, FakeTensor):
            return self.eager(x, *args, **kwargs)
        return self.compiled(x, *args, **kwargs)


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile every block's forward in place (module docstring); the model and its names are unchanged."""
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for block in blocks:
        block.forward = CompiledForward(block.forward)
    return model
