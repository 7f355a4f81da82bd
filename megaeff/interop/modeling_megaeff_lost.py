"""LLaMA with LOST projections, for `transformers` (copied into a megaeff Hugging Face export; not imported by
megaeff itself).

LOST with f = silu computes y = gamma * silu(x A^T) B^T + (1 - gamma) * x[:, I] W_s^T, which no dense weight
reproduces, so the export ships this model class and names it in config.json (`auto_map`):

    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

Everything but the seven projections of each block is transformers' own LlamaForCausalLM. The projection
hyperparameters come from config.json's `megaeff_lost` entry: rank, gamma, act and the channel count per input
width. This file needs only torch and transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class LostProjection(nn.Module):
    """y = gamma f(x A^T) B^T + (1 - gamma) x[..., I] W_s^T (megaeff/layers/lost.py)."""

    def __init__(self, in_features: int, out_features: int, rank: int, channels: int, gamma: float, act: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gamma, self.act = float(gamma), act
        self.A = nn.Parameter(torch.zeros(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.sparse_weight = nn.Parameter(torch.zeros(out_features, channels))
        self.register_buffer("channel_index", torch.zeros(channels, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.A)
        if self.act == "silu":
            h = F.silu(h)
        low = F.linear(h, self.B)
        sparse = F.linear(x.index_select(-1, self.channel_index), self.sparse_weight)
        return self.gamma * low + (1.0 - self.gamma) * sparse


class MegaeffLostLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        lost = config.megaeff_lost
        channels = {int(k): int(v) for k, v in lost["channels"].items()}
        for layer in self.model.layers:
            for parent, names in ((layer.self_attn, ATTENTION), (layer.mlp, MLP)):
                for name in names:
                    old = getattr(parent, name)
                    n_in, n_out = old.in_features, old.out_features
                    new = LostProjection(n_in, n_out, lost["rank"], channels[n_in], lost["gamma"], lost["act"])
                    setattr(parent, name, new.to(device=old.weight.device, dtype=old.weight.dtype))
        self.post_init()
