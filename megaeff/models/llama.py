"""LLaMA as the GaLore / SLTrain benchmark defines it.

RMSNorm (eps 1e-6) before attention and MLP, rotary embeddings, multi-head attention with optional grouped-query
heads, SwiGLU MLP, untied embedding and output head, no biases. Every attention and MLP projection is built by
`build_linear`, so the linear method (dense, low-rank, SLTrain, LOST) is a config choice. Every projection, norm
and SwiGLU inside the blocks computes through one activation policy (`act`, megaeff/layers/ops.py), which is how
FP8 activation compression (precision=coat) changes what is saved for backward.

Module names are the logical parameter names used by initialization and checkpoints; they must not change
with the parallel layout.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from megaeff.layers.attention import SdpaAttention
from megaeff.layers.head_loss import LMHead
from megaeff.layers.linear import build_linear
from megaeff.layers.norm import RMSNorm
from megaeff.layers.ops import ActivationOps, resolve
from megaeff.layers.rope import apply_rope, rope_tables

if TYPE_CHECKING:
    from megaeff.config.model import MethodConfig, ModelConfig


class Attention(nn.Module):
    """Only the projections go through the activation policy: q/k/v after RoPE and SDPA stay high precision."""

    def __init__(self, cfg: ModelConfig, method: MethodConfig, prefix: str, act: Optional[ActivationOps] = None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        kv_dim = self.n_kv_heads * self.head_dim
        self.q = build_linear(cfg.dim, cfg.dim, name=f"{prefix}.q", method=method, act=act)
        self.k = build_linear(cfg.dim, kv_dim, name=f"{prefix}.k", method=method, act=act)
        self.v = build_linear(cfg.dim, kv_dim, name=f"{prefix}.v", method=method, act=act)
        self.o = build_linear(cfg.dim, cfg.dim, name=f"{prefix}.o", method=method, act=act)

    def forward(self, x, cos, sin, backend, positions=None, segment_ids=None):
        q, k, v = self.q(x), self.k(x), self.v(x)
        # T from the projections: under sequence parallelism x holds a sequence shard and q/k/v the whole sequence;
        # under tensor parallelism n_heads and n_kv_heads are this rank's heads.
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, positions)
        k = apply_rope(k, cos, sin, positions)
        out = backend(q, k, v, causal=True, segment_ids=segment_ids)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, method: MethodConfig, prefix: str, act: Optional[ActivationOps] = None):
        super().__init__()
        self.ops = resolve(act)
        self.gate = build_linear(cfg.dim, cfg.ffn_dim, name=f"{prefix}.gate", method=method, act=act)
        self.up = build_linear(cfg.dim, cfg.ffn_dim, name=f"{prefix}.up", method=method, act=act)
        self.down = build_linear(cfg.ffn_dim, cfg.dim, name=f"{prefix}.down", method=method, act=act)

    def forward(self, x):
        return self.down(self.ops.swiglu(self.gate(x), self.up(x)))


class Block(nn.Module):
    """The residual adds stay high precision (they save nothing for backward)."""

    def __init__(self, cfg: ModelConfig, method: MethodConfig, index: int, act: Optional[ActivationOps] = None):
        super().__init__()
        prefix = f"layers.{index}"
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops=act)
        self.attention = Attention(cfg, method, f"{prefix}.attention", act)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops=act)
        if getattr(cfg, "moe_experts", 0) > 0:
            from megaeff.models.moe import MoE  # only MoE models need it

            self.mlp = MoE(cfg, method, f"{prefix}.mlp", act)
        else:
            self.mlp = SwiGLU(cfg, method, f"{prefix}.mlp", act)

    def forward(self, x, cos, sin, backend, positions=None, segment_ids=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, backend, positions, segment_ids)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig, method: MethodConfig, act: Optional[ActivationOps] = None):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, method, i, act) for i in range(cfg.n_layers))
        # Embedding, final norm and head stay high precision whatever the policy (as in COAT).
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # An nn.Linear whose forward can also return the fused head + cross-entropy (megaeff/layers/head_loss.py).
        self.output = LMHead(cfg.dim, cfg.vocab_size)
        head_dim = cfg.dim // cfg.n_heads
        # Derived tables, not state: non-persistent so checkpoints hold only logical weights.
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, head_dim), persistent=False)
        self.attention_backend = SdpaAttention()

    def reset_buffers(self) -> None:
        head_dim = self.cfg.dim // self.cfg.n_heads
        cos, sin = rope_tables(head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """`positions` [B, T]: RoPE positions (default 0..T-1); `segment_ids` [B, T]: tokens attend only within
        their own segment (per-document attention). Returns the fp32 logits, or with `labels` [B, T] the sum of
        the token cross-entropies (labels equal to `ignore_index` excluded) computed by the fused head, which
        never holds the whole batch's logits (`fused_loss`)."""
        x = self.run_layers(self.tok_embeddings(tokens), self.layers, positions, segment_ids)
        if labels is not None:
            if not self.fused_loss:
                raise ValueError("labels need the single-process head (LMHead); a replaced head returns logits")
            return self.output(self.norm(x), labels, ignore_index)
        return self.head(x)

    @property
    def fused_loss(self) -> bool:
        """Whether forward(labels=...) can fuse the head with the loss (not under a tensor-parallel head)."""
        return isinstance(self.output, LMHead)

    # The pieces a pipeline stage runs (megaeff/distributed/pipeline/runner.py): a stage may hold the embedding, some
    # blocks (kept under their logical names in a ModuleDict) and the head.
    def run_layers(self, x, layers, positions=None, segment_ids=None):
        for layer in layers.values() if isinstance(layers, nn.ModuleDict) else layers:
            x = layer(x, self.rope_cos, self.rope_sin, self.attention_backend, positions, segment_ids)
        return x

    def head(self, x):
        return self.output(self.norm(x)).float()


def build_llama(
    cfg: ModelConfig, method: MethodConfig, device: str | torch.device = "meta", act: Optional[ActivationOps] = None
) -> Llama:
    """Construct without allocating (meta) or directly on a device; weights are undefined until initialized.
    `act`: the activation policy of the blocks (megaeff/layers/ops.py; None = high precision; FP8 activations:
    `megaeff.precision.fp8_activations.activation_ops(cfg.precision)`)."""
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        return Llama(cfg, method, act)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: "Llama", seq_len: int, tokens_per_call: Optional[int] = None) -> float:
    """Training FLOPs per token: 6 per multiply-add of the projections (whatever their parameterization, e.g. the
    factors of a low-rank layer) and of the output head, plus the attention score and value products,
    12 * layers * dim * seq_len (PaLM appendix B). Embedding lookups cost nothing. In an MoE model a token runs
    top_k of the experts (and the router)."""
    from megaeff.layers.linear import method_layers

    cfg = model.cfg
    experts = getattr(cfg, "moe_experts", 0)
    macs = cfg.vocab_size * cfg.dim
    for name, layer in method_layers(model):
        share = cfg.moe_top_k / experts if experts and ".experts." in name else 1.0
        macs += share * layer.macs_per_token(tokens_per_call)
    if experts:
        macs += cfg.n_layers * cfg.dim * experts
    return 6.0 * macs + 12.0 * cfg.n_layers * cfg.dim * seq_len
