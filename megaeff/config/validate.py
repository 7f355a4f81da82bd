"""Cross-field validation: the checks a schema cannot express, each naming the field at fault."""

from __future__ import annotations

from typing import Optional

from megaeff.config.schema import Config
from megaeff.errors import ConfigError

ATTENTION_BACKENDS = ("auto", "sdpa", "math", "flash")
OPTIMIZERS = ("adamw", "coat_adamw")
FP8_FORMATS = ("e4m3", "e5m2")
FP8_BACKENDS = ("auto", "cuda", "triton", "cpp", "torch")
PRECISIONS = ("fp32", "bf16", "coat")
SCHEDULES = ("cosine", "constant")
OPTIM_IMPLS = ("auto", "fused", "foreach", "single")
LOGGING_BACKENDS = ("jsonl", "wandb")
DATASETS = ("default", "indexed")
TOKENIZER_KINDS = ("byte", "hf", "sentencepiece")
WANDB_MODES = ("offline", "online", "disabled")


def _positive(value, field: str) -> None:
    if value is None or value <= 0:
        raise ConfigError(field, f"must be positive, got {value}")


def _choice(value, field: str, choices) -> None:
    if value not in choices:
        raise ConfigError(field, f"must be one of {', '.join(choices)}; got {value!r}")


def layer_shapes(m) -> list:
    """(out, in) of every distinct projection shape the factory builds for model config `m`."""
    kv_dim = (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)
    ffn = (m.moe_ffn_dim or m.ffn_dim) if m.moe_experts else m.ffn_dim  # MoE experts replace the MLP
    return [(m.dim, m.dim), (kv_dim, m.dim), (ffn, m.dim), (m.dim, ffn)]


def _validate_method(cfg: Config) -> None:
    from megaeff.layers.linear import LINEAR_METHODS
    from megaeff.layers.lost import ACTIVATIONS, SPARSE_INITS
    from megaeff.layers.sltrain import PATHS

    me = cfg.method
    _choice(me.name, "method.name", tuple(LINEAR_METHODS))
    if me.name == "dense":
        return
    shapes = layer_shapes(cfg.model)
    smallest = min(min(s) for s in shapes)
    if me.rank is None or me.rank < 1:
        raise ConfigError("method.rank", f"must be >= 1, got {me.rank}")
    if me.rank >= smallest:
        raise ConfigError(
            "method.rank",
            f"{me.rank} must be below the smallest projection dimension ({smallest} for model.dim={cfg.model.dim}, "
            f"model.ffn_dim={cfg.model.ffn_dim}); set e.g. method.rank={max(1, smallest // 4)} (the generic presets "
            "suit the tiny model, the *_60m ... *_7b presets the benchmark sizes)",
        )
    if me.name == "sltrain":
        _positive(me.alpha, "method.alpha")
        if not 0.0 < me.density < 1.0:
            raise ConfigError("method.density", f"must be in (0, 1), got {me.density}")
        out, inp = min(shapes, key=lambda s: s[0] * s[1])
        if int(me.density * out * inp) < 1:
            raise ConfigError("method.density", f"{me.density} leaves no nonzero in the {out}x{inp} projections")
        out, inp = max(shapes, key=lambda s: s[0] * s[1])
        if out * inp >= 2**31:
            raise ConfigError("method.name", f"sltrain keeps int32 indices; the {out}x{inp} projection is too large")
        _choice(me.sltrain_path, "method.sltrain_path", PATHS)
    if me.name == "lost":
        if not 0.0 < me.lost_channel_ratio <= 1.0:
            raise ConfigError("method.lost_channel_ratio", f"must be in (0, 1], got {me.lost_channel_ratio}")
        if not 0.0 <= me.lost_gamma <= 1.0:
            raise ConfigError("method.lost_gamma", f"must be in [0, 1], got {me.lost_gamma}")
        _choice(me.lost_act, "method.lost_act", ACTIVATIONS)
        if me.lost_complement_rank is not None and me.lost_complement_rank < 1:
            raise ConfigError("method.lost_complement_rank", f"must be >= 1 or null (all), got {me.lost_complement_rank}")
        _choice(me.lost_sparse_init, "method.lost_sparse_init", SPARSE_INITS)


def check_pipeline(cfg: Config, dims) -> None:
    from megaeff.distributed.pipeline import SCHEDULES, split_layers

    p = cfg.parallel
    _choice(p.pp_schedule, "parallel.pp_schedule", SCHEDULES)
    _positive(p.pp_virtual, "parallel.pp_virtual")
    if p.pp_virtual > 1 and p.pp_schedule != "interleaved":
        raise ConfigError("parallel.pp_virtual", f"{p.pp_virtual} model chunks per rank need parallel.pp_schedule=interleaved "
                                                 f"(got {p.pp_schedule})")
    if p.pp_schedule == "interleaved" and cfg.train.grad_accum % dims.pp:
        raise ConfigError("train.grad_accum", f"the interleaved schedule needs the micro-batches per step "
                                              f"(train.grad_accum={cfg.train.grad_accum}) divisible by parallel.pp={dims.pp}")
    split_layers(cfg.model.n_layers, dims.pp, p.pp_virtual, p.pp_boundaries)


def check_context_parallel(cfg: Config, dims) -> None:
    from megaeff.distributed.context_parallel import IMPLS
    from megaeff.distributed.cp_lightseq import check_lightseq
    from megaeff.distributed.cp_sharding import SHARDINGS, check_seq_len

    p, m = cfg.parallel, cfg.model
    _choice(p.cp_impl, "parallel.cp_impl", IMPLS)
    _choice(p.cp_sharding, "parallel.cp_sharding", SHARDINGS)
    if p.cp_impl == "lightseq":
        check_lightseq(dims.cp, p.cp_sharding)
    if cfg.data.reset_attention_mask:
        raise ConfigError("data.reset_attention_mask", "per-document attention masks are not supported under context "
                                                       f"parallelism (parallel.cp={dims.cp})")
    check_seq_len(cfg.data.seq_len, dims.cp, p.cp_sharding)
    if p.sequence_parallel and dims.tp > 1 and (cfg.data.seq_len // dims.cp) % dims.tp:
        raise ConfigError("data.seq_len", f"{cfg.data.seq_len} / cp={dims.cp} is not divisible by tp={dims.tp} "
                                          "(sequence parallelism shards each context-parallel shard again)")
    if p.cp_impl == "ulysses":
        # Ulysses splits the heads each tensor-parallel rank holds.
        for field, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads or m.n_heads)):
            if (heads // dims.tp) % dims.cp:
                raise ConfigError(field, f"ulysses splits heads over cp: {heads} heads / tp={dims.tp} = "
                                         f"{heads // dims.tp} per rank, not divisible by cp={dims.cp}")


def validate_config(cfg: Config, world_size: Optional[int] = None, tokenizer_vocab: Optional[int] = None) -> None:
    """Raise ConfigError for the first inconsistency found; return None when the config is usable."""
    m = cfg.model
    for name in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        _positive(getattr(m, name), f"model.{name}")
    if m.dim % m.n_heads:
        raise ConfigError("model.dim", f"hidden size {m.dim} is not divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError("model.dim", f"head dim {m.dim // m.n_heads} must be even for rotary embeddings")
    if m.n_kv_heads is not None:
        _positive(m.n_kv_heads, "model.n_kv_heads")
        if m.n_heads % m.n_kv_heads:
            raise ConfigError("model.n_kv_heads", f"{m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
    _positive(m.norm_eps, "model.norm_eps")
    _positive(m.init_std, "model.init_std")
    _choice(m.attention_backend, "model.attention_backend", ATTENTION_BACKENDS)

    _validate_method(cfg)

    o = cfg.optim
    _positive(o.lr, "optim.lr")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
    if o.weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if o.grad_clip < 0:
        raise ConfigError("optim.grad_clip", f"must be >= 0 (0 disables clipping), got {o.grad_clip}")
    _choice(o.schedule, "optim.schedule", SCHEDULES)
    _choice(o.impl, "optim.impl", OPTIM_IMPLS)
    _choice(o.name, "optim.name", OPTIMIZERS)
    _choice(o.first_moment, "optim.first_moment", FP8_FORMATS)
    _choice(o.second_moment, "optim.second_moment", FP8_FORMATS)
    _choice(o.fp8_backend, "optim.fp8_backend", FP8_BACKENDS)
    if o.min_fp8_numel < 0:
        raise ConfigError("optim.min_fp8_numel", f"must be >= 0, got {o.min_fp8_numel}")

    m = cfg.model
    if m.moe_experts < 0:
        raise ConfigError("model.moe_experts", f"must be >= 0 (0: dense MLP), got {m.moe_experts}")
    if m.moe_experts:
        if not 1 <= m.moe_top_k <= m.moe_experts:
            raise ConfigError("model.moe_top_k", f"must be in 1..model.moe_experts={m.moe_experts}, got {m.moe_top_k}")
        if m.moe_ffn_dim is not None:
            _positive(m.moe_ffn_dim, "model.moe_ffn_dim")
        if m.moe_aux_loss_coef < 0:
            raise ConfigError("model.moe_aux_loss_coef", f"must be >= 0, got {m.moe_aux_loss_coef}")
        from megaeff.optim.builder import uses_fp8_states

        _choice(cfg.parallel.expert_impl, "parallel.expert_impl", ("replicated", "fssdp", "ep"))
        if cfg.parallel.expert_impl != "replicated" and uses_fp8_states(cfg.optim, cfg.precision):
            raise ConfigError("parallel.expert_impl", f"{cfg.parallel.expert_impl} keeps each expert as one flat vector, "
                              "whose FP8 groups would straddle its tensors; use optim=adamw or expert_impl=replicated")
        if cfg.parallel.expert_impl != "replicated" and cfg.method.name == "sltrain" and cfg.optim.weight_decay > 0:
            # One flat parameter per layer's experts gets one weight decay; SLTrain's sparse values are 1-D and
            # are not decayed in the single-process model.
            raise ConfigError("parallel.expert_impl", f"{cfg.parallel.expert_impl} experts with method=sltrain would "
                              "decay the sparse values; set optim.weight_decay=0 or expert_impl=replicated")

    pr = cfg.precision
    _choice(pr.name, "precision.name", PRECISIONS)
    if pr.act_group_size < 1 or 128 % pr.act_group_size:
        raise ConfigError("precision.act_group_size", f"must divide 128 (COAT uses 16), got {pr.act_group_size}")
    if pr.name != "coat":
        for flag in ("fp8_optimizer_states", "fp8_activations", "fp8_gemm"):
            if getattr(pr, flag):
                raise ConfigError(f"precision.{flag}", f"needs precision=coat (got precision={pr.name}); "
                                  "the FP8 parts are switched on and off inside precision=coat")

    d = cfg.data
    _positive(d.seq_len, "data.seq_len")
    _choice(d.name, "data.name", DATASETS)
    _choice(d.tokenizer, "data.tokenizer", TOKENIZER_KINDS)
    if d.tokenizer != "byte" and not d.tokenizer_path:
        raise ConfigError("data.tokenizer_path", f"data.tokenizer={d.tokenizer} needs the path of a local tokenizer")
    if d.name == "indexed" and not d.paths:
        raise ConfigError("data.paths", "data=indexed needs at least one dataset prefix")
    if d.reset_attention_mask and m.attention_backend == "flash":
        raise ConfigError("data.reset_attention_mask", "per-document attention needs model.attention_backend=sdpa or math")
    if d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if tokenizer_vocab is not None and tokenizer_vocab > m.vocab_size:
        raise ConfigError(
            "model.vocab_size", f"{m.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})"
        )

    t = cfg.train
    for name in ("steps", "micro_batch_size", "grad_accum", "log_interval", "eval_batch_size", "keep_last"):
        _positive(getattr(t, name), f"train.{name}")
    for name in ("eval_interval", "ckpt_interval", "exit_interval"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}", "must be >= 0 (0 disables)")
    if t.eval_max_batches is not None:
        _positive(t.eval_max_batches, "train.eval_max_batches")
    if o.warmup_steps > t.steps:
        raise ConfigError("optim.warmup_steps", f"{o.warmup_steps} exceeds train.steps={t.steps}")
    if t.max_duration_minutes is not None:
        _positive(t.max_duration_minutes, "train.max_duration_minutes")
    if t.threads is not None:
        _positive(t.threads, "train.threads")

    _choice(cfg.logging.backend, "logging.backend", LOGGING_BACKENDS)
    _choice(cfg.logging.wandb_mode, "logging.wandb_mode", WANDB_MODES)
    if cfg.logging.peak_tflops is not None:
        _positive(cfg.logging.peak_tflops, "logging.peak_tflops")

    p = cfg.parallel
    degrees = {"tp": p.tp, "cp": p.cp, "dp": p.dp, "pp": p.pp}
    wild = [k for k, v in degrees.items() if v == -1]
    if len(wild) > 1:
        raise ConfigError(f"parallel.{wild[1]}", "only one parallel degree may be -1")
    for k, v in degrees.items():
        if v != -1 and v < 1:
            raise ConfigError(f"parallel.{k}", f"must be >= 1 or -1, got {v}")
    _choice(p.dp_impl, "parallel.dp_impl", ("allreduce", "fssdp"))
    if p.dp_impl == "fssdp":
        _choice(p.fssdp_gather_dtype, "parallel.fssdp_gather_dtype", ("fp32", "bf16", "fp8"))
        _choice(p.fssdp_reduce_dtype, "parallel.fssdp_reduce_dtype", ("fp32", "bf16"))
        for key in ("fssdp_replicate_below", "fssdp_node_size"):
            if getattr(p, key) < 0:
                raise ConfigError(f"parallel.{key}", f"must be >= 0, got {getattr(p, key)}")
        if t.activation_checkpointing:
            raise ConfigError("train.activation_checkpointing", "is not supported with parallel.dp_impl=fssdp yet "
                              "(FSSDP already frees gathered weights after forward: fssdp_reshard_after_forward)")
    if p.bucket_mb <= 0:
        raise ConfigError("parallel.bucket_mb", f"must be > 0, got {p.bucket_mb}")
    if world_size is not None:
        from megaeff.distributed.dims import ParallelDims
        from megaeff.distributed.tensor_parallel import check_tp_layout

        dims = ParallelDims.from_config(p, world_size)
        if dims.pp > 1:
            check_pipeline(cfg, dims)
        if dims.cp > 1:
            check_context_parallel(cfg, dims)
        if cfg.model.moe_experts and (dims.tp > 1 or dims.pp > 1 or dims.cp > 1):
            raise ConfigError("model.moe_experts", "MoE models train with data parallelism only in this build "
                                                   f"(got tp={dims.tp} cp={dims.cp} pp={dims.pp})")
        check_tp_layout(cfg.model, dims.tp, seq_len=cfg.data.seq_len, sequence_parallel=p.sequence_parallel)
