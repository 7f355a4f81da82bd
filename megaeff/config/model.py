"""`model` and `method`: the network's shape and how its large linear layers are parameterized."""

from dataclasses import dataclass
from typing import Optional

from megaeff.config.choices import (
    AttentionBackend,
    LinearMethod,
    LostActivation,
    LostSparseInit,
    SltrainCosts,
    SltrainPath,
    require_choice,
    require_nonnegative,
    require_positive,
)
from megaeff.config.pretrained import validate_init_from
from megaeff.errors import ConfigError


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
    attention_backend: AttentionBackend = AttentionBackend["auto"]
    # Mixture of experts in place of the SwiGLU MLP of every block when moe_experts > 0: a top-k router over
    # moe_experts SwiGLU experts (hidden moe_ffn_dim, default ffn_dim), each built by the linear factory (any
    # method); moe_aux_loss_coef weighs the load-balancing loss (0: none).
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_dim: Optional[int] = None
    moe_aux_loss_coef: float = 0.0
    # A Hugging Face LLaMA directory (local; config.json + safetensors) to start from instead of the random init:
    # its weights, converted to the configured method (megaeff/interop/hf_import.py), load when no checkpoint is
    # resumed. Its shapes must equal the fields above (megaeff/config/pretrained.py).
    init_from: Optional[str] = None


def validate_model(m: ModelConfig) -> None:
    for name in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        require_positive(getattr(m, name), f"model.{name}")
    if m.dim % m.n_heads:
        raise ConfigError("model.dim", f"hidden size {m.dim} is not divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError("model.dim", f"head dim {m.dim // m.n_heads} must be even for rotary embeddings")
    if m.n_kv_heads is not None:
        require_positive(m.n_kv_heads, "model.n_kv_heads")
        if m.n_heads % m.n_kv_heads:
            raise ConfigError("model.n_kv_heads", f"{m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
    require_positive(m.norm_eps, "model.norm_eps")
    require_positive(m.init_std, "model.init_std")
    require_positive(m.rope_theta, "model.rope_theta")  # 0 makes every rotary frequency 0**x: NaN losses
    require_choice(m.attention_backend, "model.attention_backend", AttentionBackend)
    if m.moe_experts < 0:
        raise ConfigError("model.moe_experts", f"must be >= 0 (0: dense MLP), got {m.moe_experts}")
    if m.moe_experts:
        if not 1 <= m.moe_top_k <= m.moe_experts:
            raise ConfigError("model.moe_top_k", f"must be in 1..model.moe_experts={m.moe_experts}, got {m.moe_top_k}")
        if m.moe_ffn_dim is not None:
            require_positive(m.moe_ffn_dim, "model.moe_ffn_dim")
        require_nonnegative(m.moe_aux_loss_coef, "model.moe_aux_loss_coef")
    validate_init_from(m)


def check_tokenizer_vocab(m: ModelConfig, tokenizer_vocab: int) -> None:
    """Data/model compatibility, once the tokenizer is known: every token id needs an embedding row."""
    if tokenizer_vocab > m.vocab_size:
        raise ConfigError(
            "model.vocab_size", f"{m.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})"
        )


@dataclass
class MethodConfig:
    """How the large linear layers (q, k, v, o, gate, up, down) are parameterized.

    Embeddings, the output head and the norms are always dense. Fields a method does not use are ignored.
    """

    # dense | lowrank | sltrain | lost
    name: LinearMethod = LinearMethod["dense"]
    # Rank r of the low-rank factors (lowrank, sltrain, lost); must be below the smallest layer dimension.
    rank: int = 32
    # sltrain: the low-rank part is scaled by alpha / rank.
    alpha: float = 8.0
    # sltrain: fraction delta of the m x n positions in the fixed random support.
    density: float = 0.03
    # sltrain: auto (chosen per call from shape and tokens) | dense (build W, SLTrain's) | sparse (never build W)
    sltrain_path: SltrainPath = SltrainPath["auto"]
    # sltrain, auto path: the sparse kernels' cost measured per shape at start-up (measured, the default: the same on
    # every rank, kept in <run_dir>/sltrain_costs.json so that a resumption takes the same paths) or the constants
    # fitted on one CPU (fixed: the same choice on every machine and layout, for bit-reproducible runs).
    sltrain_costs: SltrainCosts = SltrainCosts["measured"]
    # lost: fraction s of input channels in the dense channel block (at least one channel).
    lost_channel_ratio: float = 0.05
    # lost: fixed mixing weight gamma of the low-rank branch; the channel branch gets 1 - gamma.
    lost_gamma: float = 0.5
    # lost: nonlinearity f between the factors, silu | none.
    lost_act: LostActivation = LostActivation["silu"]
    # lost: singular triplets after the top r that build the complement scoring the channels; null = all.
    lost_complement_rank: Optional[int] = None
    # lost: the channel block starts from W0's columns (w0) or the complement's (complement, an ablation).
    lost_sparse_init: LostSparseInit = LostSparseInit["w0"]


def layer_shapes(m: ModelConfig) -> list:
    """(out, in) of every distinct projection shape the factory builds for model config `m`."""
    kv_dim = (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)
    ffn = (m.moe_ffn_dim or m.ffn_dim) if m.moe_experts else m.ffn_dim  # MoE experts replace the MLP
    return [(m.dim, m.dim), (kv_dim, m.dim), (ffn, m.dim), (m.dim, ffn)]


def validate_method(me: MethodConfig, m: ModelConfig) -> None:
    require_choice(me.name, "method.name", LinearMethod)
    if me.name == "dense":
        return
    shapes = layer_shapes(m)
    smallest = min(min(s) for s in shapes)
    if me.rank is None or me.rank < 1:
        raise ConfigError("method.rank", f"must be >= 1, got {me.rank}")
    if me.rank >= smallest:
        raise ConfigError(
            "method.rank",
            f"{me.rank} must be below the smallest projection dimension ({smallest} for model.dim={m.dim}, "
            f"model.ffn_dim={m.ffn_dim}); set e.g. method.rank={max(1, smallest // 4)} (the generic presets "
            "suit the tiny model, the *_60m ... *_7b presets the benchmark sizes)",
        )
    if me.name == "sltrain":
        _validate_sltrain(me, shapes)
    if me.name == "lost":
        _validate_lost(me)


def _validate_sltrain(me: MethodConfig, shapes: list) -> None:
    require_positive(me.alpha, "method.alpha")
    if not 0.0 < me.density < 1.0:
        raise ConfigError("method.density", f"must be in (0, 1), got {me.density}")
    out, inp = min(shapes, key=lambda s: s[0] * s[1])
    if int(me.density * out * inp) < 1:
        raise ConfigError("method.density", f"{me.density} leaves no nonzero in the {out}x{inp} projections")
    out, inp = max(shapes, key=lambda s: s[0] * s[1])
    if out * inp >= 2**31:
        raise ConfigError("method.name", f"sltrain keeps int32 indices; the {out}x{inp} projection is too large")
    require_choice(me.sltrain_path, "method.sltrain_path", SltrainPath)
    require_choice(me.sltrain_costs, "method.sltrain_costs", SltrainCosts)


def _validate_lost(me: MethodConfig) -> None:
    if not 0.0 < me.lost_channel_ratio <= 1.0:
        raise ConfigError("method.lost_channel_ratio", f"must be in (0, 1], got {me.lost_channel_ratio}")
    if not 0.0 <= me.lost_gamma <= 1.0:
        raise ConfigError("method.lost_gamma", f"must be in [0, 1], got {me.lost_gamma}")
    require_choice(me.lost_act, "method.lost_act", LostActivation)
    if me.lost_complement_rank is not None and me.lost_complement_rank < 1:
        raise ConfigError("method.lost_complement_rank", f"must be >= 1 or null (all), got {me.lost_complement_rank}")
    require_choice(me.lost_sparse_init, "method.lost_sparse_init", LostSparseInit)
