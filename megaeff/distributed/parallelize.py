"""`parallelize(model, dims, pcfg)`: the one place a logical (single-process) LLaMA becomes this rank's part of a
parallel layout, always in the same order:

    pipeline split -> tensor / sequence parallel -> context parallel -> activation checkpointing -> FSSDP

The last step, FSSDP (and distributed MoE experts), shards real tensors, so the trainer applies it to the
materialized model (megaeff/distributed/fssdp/engine.py, expert_parallel.py); everything before runs here.
It runs on the meta-built model, before materialization, so no rank ever allocates the whole model: every
replaced module keeps its logical name and its `init_weights` draws the logical tensors from the seed and keeps
this rank's shard (megaeff/models/init.py, megaeff/distributed/tensor_parallel/base.py).

Tensor parallelism of a block (Megatron's): q, k, v, gate and up column-parallel, o and down row-parallel, so
attention runs on n_heads/tp local heads (kv heads likewise) and the MLP on ffn/tp local features, with one
collective pair per sub-layer. The embedding is vocab-parallel and the head column-parallel without gathering
its output: the loss is `vocab_parallel_cross_entropy` on the vocab-sharded logits (`loss_sum`).

Sequence parallelism keeps the residual stream and the norms sharded along the sequence between the TP
regions; the norm gains then see only this rank's tokens, so their gradient is all-reduced over tp in backward
(`SequenceParallelRMSNorm`, Megatron's `sequence_parallel` gradient all-reduce done inside autograd). Where the
column layers enter their region with the input itself (dense, SLTrain), the attention and MLP inputs are
gathered once for q, k, v (gate, up) as in Megatron, not once per projection; lowrank and LOST gather their
rank-sized intermediates per projection instead, which is the smaller volume.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from megaeff.data.sampler import IGNORE_INDEX
from megaeff.distributed.comm import CommGroup, copy_to_region, gather_seq
from megaeff.distributed.pipeline.runner import prune_to_stages, stage_chunks
from megaeff.distributed.tensor_parallel.layers import (
    VocabParallelEmbedding,
    check_tp_layout,
    parallel_linear,
    vocab_parallel_cross_entropy,
)
from megaeff.layers.linear import DenseLinear
from megaeff.layers.norm import RMSNorm

COLUMN = ("attention.q", "attention.k", "attention.v", "mlp.gate", "mlp.up")
ROW = ("attention.o", "mlp.down")


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm on a sequence shard: the gain is replicated, its per-rank gradient a partial sum over tokens."""

    def __init__(self, dim: int, eps: float, cg: CommGroup, *, ops=None):
        super().__init__(dim, eps, ops=ops)
        self.cg = cg

    @classmethod
    def replacing(cls, norm: RMSNorm, cg: CommGroup) -> "SequenceParallelRMSNorm":
        with torch.device(norm.weight.device):
            return cls(norm.weight.shape[0], norm.eps, cg, ops=norm.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rmsnorm(x, copy_to_region(self.weight, self.cg), self.eps)


def _share_input_gather(module: nn.Module, projections, cg: CommGroup) -> None:
    layers = [getattr(module, name) for name in projections]
    if not all(layer.gathers_input for layer in layers):
        return
    for layer in layers:
        layer.input_gathered = True
    module.register_forward_pre_hook(lambda _, args: (gather_seq(args[0], cg, 1), *args[1:]))


def _swap(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def apply_tensor_parallel(model: nn.Module, dims, *, sequence_parallel: bool = False) -> nn.Module:
    """Replace the projections, embedding, head and (with SP) norms of a logical Llama by this rank's shards."""
    tp = dims.tp
    cfg = model.cfg
    check_tp_layout(cfg, tp)
    sp = bool(sequence_parallel)
    cg = dims.comm("tp")
    for key, block in model.layers.named_children():  # a pipeline stage keeps only its blocks, by logical index
        for rel in COLUMN + ROW:
            path = f"layers.{key}.{rel}"
            style = "column" if rel in COLUMN else "row"
            _swap(model, path, parallel_linear(model.get_submodule(path), dims, style, sequence_parallel=sp))
        block.attention.n_heads //= tp
        block.attention.n_kv_heads //= tp
        if sp:
            _share_input_gather(block.attention, ("q", "k", "v"), cg)
            _share_input_gather(block.mlp, ("gate", "up"), cg)
            block.attention_norm = SequenceParallelRMSNorm.replacing(block.attention_norm, cg)
            block.mlp_norm = SequenceParallelRMSNorm.replacing(block.mlp_norm, cg)
    with torch.device(model.rope_cos.device):
        if model.tok_embeddings is not None:
            model.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, dims, sequence_parallel=sp)
        if model.output is not None:
            # The head stays high precision (no activation policy), as in the single-process model.
            head = DenseLinear(cfg.dim, cfg.vocab_size, name="output")
            model.output = parallel_linear(head, dims, "column", sequence_parallel=sp)
    if sp and model.norm is not None:
        model.norm = SequenceParallelRMSNorm.replacing(model.norm, cg)
    model.tensor_parallel = tp
    return model


def apply_context_parallel(model: nn.Module, dims, *, impl: str = "ring", sharding: str = "zigzag") -> nn.Module:
    """Attention over the cp group's sequence shards (megaeff/distributed/context_parallel/attention.py); the caller feeds
    every rank its shard of the tokens (`model.context_parallel.shard`) and their global positions."""
    from megaeff.distributed.context_parallel.attention import ContextParallelAttention

    model.context_parallel = ContextParallelAttention(dims.comm("cp"), impl=impl, sharding=sharding, backend="math")
    model.attention_backend = model.context_parallel
    return model


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Each block recomputes its forward in backward. The block keeps its name (the forward is wrapped on the
    instance, not the module replaced), so initialization and checkpoints are unchanged. Under context
    parallelism the recomputation replays attention's kept output and log-sum-exp (LightSeq)."""
    from torch.utils.checkpoint import checkpoint

    cp = getattr(model, "context_parallel", None)
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for block in blocks:
        if cp is not None:
            block.forward = functools.partial(cp.checkpoint, block.forward)
        else:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def parallelize(model: nn.Module, dims, pcfg, *, activation_checkpointing: bool = False) -> nn.Module:
    """This rank's part of `model` (meta-built, logical) under the layout of `dims` and the `parallel` config.
    With pp > 1 the result holds only this rank's stages and `pipeline_chunks` describes them; with cp > 1
    `context_parallel` shards the token tensors. Set `model.attention_backend` before: cp wraps it."""
    if dims.pp > 1:
        model.pipeline_chunks = stage_chunks(model.cfg.n_layers, dims, pcfg.pp_virtual, pcfg.pp_boundaries)
        prune_to_stages(model, model.pipeline_chunks)
    if dims.tp > 1:
        apply_tensor_parallel(model, dims, sequence_parallel=pcfg.sequence_parallel)
    if dims.cp > 1:
        apply_context_parallel(model, dims, impl=pcfg.cp_impl, sharding=pcfg.cp_sharding)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, dims) -> torch.Tensor:
    """Sum of token losses (ignored labels excluded); logits are vocab-sharded under tensor parallelism."""
    if dims.tp > 1:
        return vocab_parallel_cross_entropy(logits, labels, dims, ignore_index=IGNORE_INDEX).sum()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
