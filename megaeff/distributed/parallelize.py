"""`parallelize(model, dims, cfg) -> ParallelModel`: the one place a logical (single-process) LLaMA becomes this
rank's part of a parallel layout and gets what trains it, always in the same order:

    pipeline split -> tensor / sequence parallel -> context parallel -> compile (`train.compile`, compile.py)
    -> activation checkpointing -> materialization (if the model is still on the meta device; then
    `precision.param_dtype`) -> data parallelism:
       MoE experts over dp x cp (expert_parallel.parallelize_experts), then FSSDP or the bucketed GradReducer

Why this order. The first four steps replace modules of the meta-built model, so no rank ever allocates the
whole model: every replaced module keeps its logical name and its `init_weights` draws the logical tensors from
the seed and keeps this rank's shard (megaeff/models/init.py, megaeff/distributed/tensor_parallel/base.py).
Context parallelism wraps the attention backend (set `model.attention_backend` before), and activation
checkpointing wraps the blocks' forwards, replaying context-parallel attention where there is one.
Materialization then allocates this rank's part, and `annotate_parameters` gives each parameter its record
(`ParamMeta`, megaeff/layers/param_meta.py: tp split and logical shape; moving off the meta device creates new
Parameters, so it comes after). The data-parallel step shards real tensors, so it runs last: distributed experts
replace each MoE by a module holding one flat parameter (marked `expert` in its record and reduced by its own
exchange, so left out of what follows); FSSDP then shards the other parameters in place, reading their records
(and setting their dp fields), and becomes both the gradient sync and the checkpoint view; without it
the GradReducer buckets the replicated gradients, and `logical_state.LogicalState` is the checkpoint view.
The optimizer is built by the caller afterwards, on the parameters of `ParallelModel.module` (FSSDP's shards).
The GradReducer was built after the optimizer before this function did it; the order does not matter: the
reducer only reads the parameters (identity, shape, dtype, device), allocates zeroed buckets and registers
post-accumulate-grad hooks, and building the optimizer neither replaces parameters nor touches gradients.

Tensor parallelism of a block (Megatron's): q, k, v, gate and up column-parallel, o and down row-parallel, so
attention runs on n_heads/tp local heads (kv heads likewise) and the MLP on ffn/tp local features, with one
collective pair per sub-layer. The embedding is vocab-parallel and the head column-parallel without gathering
its output (the loss: tensor_parallel/sequence.py, `loss_sum`). Under sequence parallelism the norms become
`SequenceParallelRMSNorm`s (tensor_parallel/sequence.py); where the column layers enter their region with the
input itself (dense, SLTrain), the attention and MLP inputs are gathered once for q, k, v (gate, up) as in
Megatron, not once per projection; lowrank and LOST gather their rank-sized intermediates per projection
instead, which is the smaller volume.
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence

import torch
from torch import nn

from megaeff.distributed import logical_state
from megaeff.distributed.comm import CommGroup
from megaeff.distributed.compile import apply_compile
from megaeff.distributed.data_parallel.bucketed import GradReducer
from megaeff.distributed.expert_parallel.experts import parallelize_experts
from megaeff.distributed.fssdp.engine import FSSDP
from megaeff.distributed.parallel_model import ParallelModel
from megaeff.distributed.pipeline.stages import StageChunk, prune_to_stages, stage_chunks
from megaeff.distributed.tensor_parallel.layers import VocabParallelEmbedding, check_tp_layout, parallel_linear
from megaeff.distributed.tensor_parallel.mappings import gather_seq
from megaeff.distributed.tensor_parallel.sequence import SequenceParallelRMSNorm
from megaeff.layers import grad_accum_fusion
from megaeff.layers.linear import DenseLinear
from megaeff.layers.param_meta import param_meta
from megaeff.models.init import materialize

if TYPE_CHECKING:
    from megaeff.config.parallel import ParallelConfig
    from megaeff.config.schema import Config
    from megaeff.distributed.dims import ParallelDims

COLUMN = ("attention.q", "attention.k", "attention.v", "mlp.gate", "mlp.up")
ROW = ("attention.o", "mlp.down")


def split_pipeline(model: nn.Module, dims: ParallelDims, pcfg: ParallelConfig) -> List[StageChunk]:
    """Keep this rank's pipeline stages of the model (megaeff/distributed/pipeline/stages.py); returns them."""
    chunks = stage_chunks(model.cfg.n_layers, dims, pcfg.pp_virtual, pcfg.pp_boundaries)
    prune_to_stages(model, chunks)
    return chunks


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


def apply_tensor_parallel(model: nn.Module, dims: ParallelDims, *, sequence_parallel: bool = False) -> nn.Module:
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
            # As the single-process LMHead, the head keeps autograd's .grad under grad_accum_fusion.
            model.output.lm_head = True
    if sp and model.norm is not None:
        model.norm = SequenceParallelRMSNorm.replacing(model.norm, cg)
    model.tensor_parallel = tp
    return model


def apply_context_parallel(
    model: nn.Module, dims: ParallelDims, *, impl: str = "ring", sharding: str = "zigzag", backend: str = "auto"
):
    """Attention over the cp group's sequence shards (megaeff/distributed/context_parallel/attention.py): becomes
    the model's attention backend and is returned; the caller feeds every rank its shard of the tokens
    (`shard`) and their global positions. `backend` (`model.attention_backend`) picks the block kernel:
    auto/sdpa/flash the fused ones (context_parallel/flash_blocks.py), math the exact one."""
    from megaeff.distributed.context_parallel.attention import ContextParallelAttention

    cp = ContextParallelAttention(dims.comm("cp"), impl=impl, sharding=sharding, backend=backend)
    model.attention_backend = cp
    return cp


def apply_activation_checkpointing(model: nn.Module, context=None) -> nn.Module:
    """Each block recomputes its forward in backward. The block keeps its name (the forward is wrapped on the
    instance, not the module replaced), so initialization and checkpoints are unchanged. Under context
    parallelism (`context`, the ContextParallelAttention) the recomputation replays attention's kept output and
    log-sum-exp (LightSeq)."""
    from torch.utils.checkpoint import checkpoint

    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for block in blocks:
        if context is not None:
            block.forward = functools.partial(context.checkpoint, block.forward)
        else:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def apply_data_parallel(
    model: nn.Module,
    dims: ParallelDims,
    pcfg: ParallelConfig,
    *,
    moe: bool = False,
    chunks: Sequence[StageChunk] = (),
    context=None,
) -> ParallelModel:
    """The data-parallel step on the materialized, annotated model (see the module docstring): MoE experts
    spread over dp x cp unless replicated, then FSSDP (`dp_impl=fssdp`) or the bucketed GradReducer."""
    dp_cp = dims.size("dp_cp")
    experts_distributed = moe and pcfg.expert_impl != "replicated" and dp_cp > 1
    if experts_distributed:
        parallelize_experts(model, dims, pcfg.expert_impl)
    # The experts' flat parameters are reduced by their own exchange, not by the data-parallel step.
    own_exchange = {id(p) for p in model.parameters() if param_meta(p).expert}
    dp_sharded = pcfg.dp_impl == "fssdp" and dp_cp > 1
    if dp_sharded:
        # The model's parameters become this rank's shards; checkpoints gather them back to logical tensors.
        grad_sync = state = FSSDP(
            model,
            dims,
            reshard_after_forward=pcfg.fssdp_reshard_after_forward,
            gather_dtype=pcfg.fssdp_gather_dtype,
            reduce_dtype=pcfg.fssdp_reduce_dtype,
            replicate_below=pcfg.fssdp_replicate_below,
            node_size=pcfg.fssdp_node_size,
            ignored_params=[p for p in model.parameters() if id(p) in own_exchange],
        )
    else:
        reduced = [(n, p) for n, p in model.named_parameters() if id(p) not in own_exchange]
        grad_sync = GradReducer(reduced, dims, bucket_mb=pcfg.bucket_mb, overlap=pcfg.overlap_grad_reduce)
        state = logical_state.LogicalState(model)
    return ParallelModel(
        model,
        grad_sync,
        state,
        chunks=list(chunks),
        context=context,
        dp_sharded=dp_sharded,
        experts_distributed=experts_distributed,
    )


def store_parameters_in(model: nn.Module, dtype: torch.dtype) -> None:
    """`precision.param_dtype`: floating-point parameters (not buffers: RoPE tables, indices) stored in `dtype`,
    after materialization drew them in fp32 (so a bf16 run starts from the rounded fp32 initialization)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    cfg: Config,
    *,
    device: Optional[torch.device] = None,
    init_weights: Optional[Mapping[str, torch.Tensor]] = None,
) -> ParallelModel:
    """This rank's part of `model` (logical, normally meta-built) under the layout of `dims` and the config
    (`cfg.parallel`; `train.activation_checkpointing`, and `train.seed` / `model.init_std` to materialize on
    `device`, default `dims.device`), in the order of the module docstring. With pp > 1 the module holds only
    this rank's stages (`ParallelModel.chunks`); with cp > 1 `ParallelModel.context` shards the token tensors.
    Set `model.attention_backend` before: context parallelism wraps it. `init_weights`: dense weights by logical
    name that replace the seed's draws in materialization (megaeff/models/init.py `Initializer`; `model.init_from`)."""
    pcfg, t = cfg.parallel, cfg.train
    chunks = split_pipeline(model, dims, pcfg) if dims.pp > 1 else []
    if dims.tp > 1:
        apply_tensor_parallel(model, dims, sequence_parallel=pcfg.sequence_parallel)
    context = None
    if dims.cp > 1:
        context = apply_context_parallel(
            model, dims, impl=pcfg.cp_impl, sharding=pcfg.cp_sharding, backend=cfg.model.attention_backend
        )
    if t.compile:  # the blocks' forwards, in place: names unchanged, checkpointing then wraps the compiled forward
        apply_compile(model)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model, context)
    if any(x.is_meta for x in itertools.chain(model.parameters(), model.buffers())):
        model = materialize(model, device or dims.device, t.seed, cfg.model.init_std, weights=init_weights)
    if cfg.precision.param_dtype == "bf16":
        store_parameters_in(model, torch.bfloat16)
    if cfg.precision.grad_accum_fusion:  # before data parallelism: its reducer buckets the fused main_grads
        grad_accum_fusion.enable(model)
    logical_state.annotate_parameters(model)
    return apply_data_parallel(model, dims, pcfg, moe=bool(cfg.model.moe_experts), chunks=chunks, context=context)
