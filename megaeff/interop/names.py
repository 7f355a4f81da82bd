"""Logical megaeff parameter names <-> Hugging Face LLaMA tensor names.

megaeff's RoPE is LLaMA's rotate-half convention on the heads as laid out by the q/k projections' rows
(megaeff/layers/rope.py), which is exactly the layout of `transformers`' LlamaAttention, so q and k rows map
one to one: no Meta -> HF interleave permutation is needed (or correct) here. A test exports with the
permutation applied anyway and sees the logits move far outside the tolerance.
"""

from __future__ import annotations

import re
from typing import Dict

# Per block: megaeff module path -> HF module path (the parameter name after it is kept: `weight`, or LOST's).
BLOCK_MODULES: Dict[str, str] = {
    "attention_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attention.q": "self_attn.q_proj",
    "attention.k": "self_attn.k_proj",
    "attention.v": "self_attn.v_proj",
    "attention.o": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
TOP_LEVEL: Dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)\.([^.]+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)\.([^.]+)$")
_HF_MODULES = {v: k for k, v in BLOCK_MODULES.items()}
_HF_TOP = {v: k for k, v in TOP_LEVEL.items()}


def to_hf(name: str) -> str:
    """`layers.3.attention.q.weight` -> `model.layers.3.self_attn.q_proj.weight`; raises KeyError for a name
    without a Hugging Face LLaMA counterpart (an MoE router, say)."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    m = _BLOCK.match(name)
    if m is None or m.group(2) not in BLOCK_MODULES:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{BLOCK_MODULES[m.group(2)]}.{m.group(3)}"


def from_hf(name: str) -> str:
    """The inverse of `to_hf`."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_BLOCK.match(name)
    if m is None or m.group(2) not in _HF_MODULES:
        raise KeyError(name)
    return f"layers.{m.group(1)}.{_HF_MODULES[m.group(2)]}.{m.group(3)}"
