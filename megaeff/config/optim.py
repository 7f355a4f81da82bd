"""`optim` and `precision`: the optimizer, its schedule, and the numeric formats of training."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

from megaeff.config.choices import (
    Fp8Backend,
    Fp8Format,
    GaloreProjector,
    GaloreSide,
    LrSchedule,
    OptimImpl,
    Optimizer,
    ParamDtype,
    Precision,
    require_choice,
    require_nonnegative,
    require_positive,
)
from megaeff.errors import ConfigError

if TYPE_CHECKING:
    from megaeff.config.schema import Config


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer["adamw"]
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    # auto picks fused on CUDA and CPU, foreach elsewhere; apex: apex's multi-tensor Adam (CUDA with apex only,
    # docs/gpu.md).
    impl: OptimImpl = OptimImpl["auto"]
    grad_clip: float = 1.0
    # Linear warmup length in steps; null: warmup_fraction x train.steps (so a shortened run keeps its shape).
    warmup_steps: Optional[int] = None
    warmup_fraction: float = 0.1
    # Cosine decays to lr * min_lr_ratio at the last step, then stays there.
    min_lr_ratio: float = 0.1
    # cosine | constant
    schedule: LrSchedule = LrSchedule["cosine"]
    # FP8 AdamW (COAT; used when name=coat_adamw or precision.fp8_optimizer_states=true):
    # moment formats e4m3 | e5m2 (second moment only), Dynamic Range Expansion on/off,
    # logical tensors smaller than min_fp8_numel keep FP32 moments,
    # kernel backend auto | cuda | triton | cpp | torch (auto: best available; the run log names it).
    first_moment: Fp8Format = Fp8Format["e4m3"]
    second_moment: Fp8Format = Fp8Format["e4m3"]
    expand: bool = True
    min_fp8_numel: int = 4096
    fp8_backend: Fp8Backend = Fp8Backend["auto"]
    # Optimizer in backward: each parameter is updated by its own optimizer step as soon as its gradient is final
    # (the last micro-batch's backward), and the gradient is freed at once (megaeff/optim/per_param.py).
    in_backward: bool = False
    # GaLore (name=galore; megaeff/optim/galore.py, docs/configuration.md): the dense attention and MLP weights'
    # Adam moments live in a rank-galore_rank projection of the gradient, refreshed every galore_update_proj_gap
    # steps; the update is scaled by galore_scale. galore_side: auto (the smaller side, GaLore's "std") | left |
    # right. galore_projector: svd | randomized (subspace iteration: galore_power_iters rounds, a sketch of
    # rank + galore_oversample columns; GaLore+'s fast SVD). galore_cross_head: attention bases from one head's
    # gradient, shared by all heads (GaLore+).
    galore_rank: int = 128
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    galore_side: GaloreSide = GaloreSide["auto"]
    galore_projector: GaloreProjector = GaloreProjector["svd"]
    galore_power_iters: int = 2
    galore_oversample: int = 8
    galore_cross_head: bool = False
    # Filled in when the config is composed, not set by hand: {field: user | experiment | method default | optim
    # default}, where each value above came from (megaeff/config/provenance.py; the run log prints it).
    sources: Dict[str, str] = field(default_factory=dict)


# The labels of `OptimConfig.sources`, highest precedence first (megaeff/config/provenance.py).
OPTIM_SOURCES = ("user", "experiment", "method default", "optim default")


def warmup_steps_for(o: OptimConfig, train_steps: int) -> int:
    """The warmup length the schedule uses: `warmup_steps` when set, else `warmup_fraction` of the run."""
    if o.warmup_steps is not None:
        return int(o.warmup_steps)
    return int(round(o.warmup_fraction * train_steps))


def validate_optim(o: OptimConfig, train_steps: int) -> None:
    require_positive(o.lr, "optim.lr")
    require_positive(o.eps, "optim.eps")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
    require_nonnegative(o.weight_decay, "optim.weight_decay")
    if o.warmup_steps is not None:
        if o.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
        if o.warmup_steps > train_steps:
            raise ConfigError(
                "optim.warmup_steps",
                f"{o.warmup_steps} exceeds train.steps={train_steps}; lower it, or leave it unset (null) so that "
                f"optim.warmup_fraction={o.warmup_fraction} of the steps warm up",
            )
    if not 0.0 <= o.warmup_fraction <= 1.0:
        raise ConfigError("optim.warmup_fraction", f"must be in [0, 1], got {o.warmup_fraction}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    require_nonnegative(o.grad_clip, "optim.grad_clip", " (0 disables clipping)")
    require_choice(o.schedule, "optim.schedule", LrSchedule)
    require_choice(o.impl, "optim.impl", OptimImpl)
    require_choice(o.name, "optim.name", Optimizer)
    require_choice(o.first_moment, "optim.first_moment", Fp8Format)
    require_choice(o.second_moment, "optim.second_moment", Fp8Format)
    require_choice(o.fp8_backend, "optim.fp8_backend", Fp8Backend)
    for key, source in o.sources.items():
        if key == "sources" or not hasattr(o, key) or source not in OPTIM_SOURCES:
            raise ConfigError(
                f"optim.sources.{key}",
                f"got {source!r}; composing fills this in: an optimizer field -> one of {', '.join(OPTIM_SOURCES)}",
            )
    if o.min_fp8_numel < 0:
        raise ConfigError("optim.min_fp8_numel", f"must be >= 0, got {o.min_fp8_numel}")
    validate_galore_fields(o)


def validate_galore_fields(o: OptimConfig) -> None:
    require_choice(o.galore_side, "optim.galore_side", GaloreSide)
    require_choice(o.galore_projector, "optim.galore_projector", GaloreProjector)
    for key in ("galore_rank", "galore_update_proj_gap"):
        if getattr(o, key) < 1:
            raise ConfigError(f"optim.{key}", f"must be >= 1, got {getattr(o, key)}")
    require_positive(o.galore_scale, "optim.galore_scale")
    for key in ("galore_power_iters", "galore_oversample"):
        if getattr(o, key) < 0:
            raise ConfigError(f"optim.{key}", f"must be >= 0, got {getattr(o, key)}")


def validate_galore(cfg: "Config") -> None:
    """What optim=galore cannot run with (docs/configuration.md, GaLore): each refusal names its field."""
    o, pr, p = cfg.optim, cfg.precision, cfg.parallel
    if o.name != "galore":
        return
    why = {
        "method.name": (
            cfg.method.name != "dense",
            f"optim=galore projects the gradients of full-rank (dense) weights; method={cfg.method.name} already "
            "trains compact factors. Use method=dense with optim=galore, or another optimizer",
        ),
        "precision.fp8_optimizer_states": (
            pr.fp8_optimizer_states,
            "COAT's FP8 moments (1x128 groups of the weight, updated by a fused kernel that writes the weight) do "
            "not apply to GaLore's projected moments; set precision.fp8_optimizer_states=false (FP8 activations "
            "and GEMMs compose with GaLore) or use optim=coat_adamw",
        ),
        "parallel.tp": (
            p.tp > 1,
            f"optim=galore needs whole weight gradients for its SVD; tensor parallelism (parallel.tp={p.tp}) "
            "holds shards. Use parallel.tp=1 (data, pipeline and context parallelism work)",
        ),
        "parallel.dp_impl": (
            p.dp_impl == "fssdp",
            "optim=galore needs whole weight gradients for its SVD; FSSDP shards them. Use parallel.dp_impl=allreduce",
        ),
        "optim.in_backward": (
            o.in_backward,
            "per-parameter updates are not implemented for optim=galore; set optim.in_backward=false",
        ),
        "precision.param_dtype": (
            pr.param_dtype == "bf16",
            "bf16 weights (per-parameter updates) are not implemented for optim=galore; use precision.param_dtype=fp32",
        ),
    }
    for field_name, (bad, message) in why.items():
        if bad:
            raise ConfigError(field_name, message)


@dataclass
class PrecisionConfig:
    # fp32 | bf16 (bf16 autocast, fp32 master weights and optimizer states) | coat (the FP8 switches below on)
    name: Precision = Precision["fp32"]
    # bf16 autocast for what stays high precision (always on for name=bf16).
    autocast_bf16: bool = False
    # COAT parts, each on its own: FP8 AdamW moments; activations saved for backward in FP8 (linear inputs
    # per-tensor E4M3, non-linear inputs in 1 x act_group_size groups, gradients E5M2); FP8 GEMMs (torch._scaled_mm,
    # E4M3 operands, E5M2 gradients) in every projection matmul: dense layers, the lowrank / SLTrain / LOST
    # factors, LOST's channel block, SLTrain's densified W (its sparse products stay high precision).
    # conf/precision/coat.yaml runs them on FP32, coat_bf16.yaml on BF16 autocast (autocast_bf16) as the paper.
    fp8_optimizer_states: bool = False
    fp8_activations: bool = False
    fp8_gemm: bool = False
    act_group_size: int = 16
    # Parameter storage: fp32 (master weights), or bf16 with no fp32 master: each update is computed on an fp32
    # copy of one parameter and written back with stochastic rounding (megaeff/optim/per_param.py). Needs bf16
    # autocast (precision=bf16, or autocast_bf16 under coat).
    param_dtype: ParamDtype = ParamDtype["fp32"]
    # Gradient-accumulation fusion (Megatron's gradient_accumulation_fusion; needs param_dtype=bf16): each dense
    # projection's weight gradient is accumulated over micro-batches in an fp32 `main_grad` buffer (apex's
    # wgrad GEMM on CUDA where installed, else torch), not in a bf16 `.grad` rounded at every micro-batch
    # (megaeff/layers/grad_accum_fusion.py; the combinations it does not cover are refused).
    grad_accum_fusion: bool = False


def validate_precision(pr: PrecisionConfig) -> None:
    require_choice(pr.name, "precision.name", Precision)
    require_choice(pr.param_dtype, "precision.param_dtype", ParamDtype)
    if pr.param_dtype == "bf16" and not (pr.name == "bf16" or pr.autocast_bf16):
        raise ConfigError(
            "precision.param_dtype",
            f"bf16 weights need bf16 autocast (precision=bf16, or precision.autocast_bf16=true under coat); got "
            f"precision={pr.name} with autocast off, which would run norms, softmax and the loss in bf16",
        )
    if pr.act_group_size < 1 or 128 % pr.act_group_size:
        raise ConfigError("precision.act_group_size", f"must divide 128 (COAT uses 16), got {pr.act_group_size}")
    if pr.name != "coat":
        for flag in ("fp8_optimizer_states", "fp8_activations", "fp8_gemm"):
            if getattr(pr, flag):
                raise ConfigError(
                    f"precision.{flag}",
                    f"needs precision=coat (got precision={pr.name}); "
                    "the FP8 parts are switched on and off inside precision=coat",
                )


def uses_fp8_states(o: OptimConfig, pr: PrecisionConfig) -> bool:
    """Whether the run keeps FP8 AdamW moments (megaeff.optim.builder.uses_fp8_states decides the same)."""
    return o.name == "coat_adamw" or bool(pr.fp8_optimizer_states)


def validate_in_backward(cfg: "Config") -> None:
    """The combinations `optim.in_backward=true` cannot run correctly (megaeff/train/in_backward.py says why):
    dropping a whole step on a non-finite value (the updates happen before the loss is known), and per-parameter
    clipping where a parameter's logical gradient norm would need a collective inside backward that megaeff
    does not issue (tensor-parallel shards, experts spread over dp x cp)."""
    o, t, p = cfg.optim, cfg.train, cfg.parallel
    if not o.in_backward:
        return
    if t.nonfinite == "skip":
        raise ConfigError(
            "train.nonfinite",
            "skip cannot be combined with optim.in_backward=true: parameters are updated during backward, before "
            "the step's loss and gradient norm are known, so a step cannot be dropped; use train.nonfinite=stop "
            "(a non-finite gradient is not applied and the run stops after the step)",
        )
    if o.grad_clip > 0 and p.tp > 1:
        raise ConfigError(
            "optim.grad_clip",
            f"per-parameter clipping under optim.in_backward=true is not supported with parallel.tp={p.tp} "
            "(a tp shard's logical norm would need a tp all-reduce per parameter inside backward); set "
            "optim.grad_clip=0 or optim.in_backward=false",
        )
    if o.grad_clip > 0 and cfg.model.moe_experts and p.expert_impl != "replicated" and p.dp * p.cp > 1:
        raise ConfigError(
            "optim.grad_clip",
            f"per-parameter clipping under optim.in_backward=true is not supported with parallel.expert_impl="
            f"{p.expert_impl} (one flat parameter holds many experts); set optim.grad_clip=0, "
            "parallel.expert_impl=replicated or optim.in_backward=false",
        )


def validate_grad_accum_fusion(cfg: "Config") -> None:
    """`precision.grad_accum_fusion=true` where megaeff/layers/grad_accum_fusion.py does not apply or was not
    built for: one ConfigError naming the field at fault. tp, pp and cp > 1 run it (the tensor-parallel dense
    shards' weight gradients are complete per rank, pipeline stages hold disjoint weights, context parallelism
    sums over dp x cp like data parallelism; tests/distributed/test_grad_accum_fusion_layouts.py)."""
    pr, o, p = cfg.precision, cfg.optim, cfg.parallel
    if not pr.grad_accum_fusion:
        return
    off = "set precision.grad_accum_fusion=false"
    why = {
        "precision.param_dtype": (
            pr.param_dtype != "bf16",
            "gradient-accumulation fusion needs precision.param_dtype=bf16: with fp32 weights autograd's .grad "
            f"is already the fp32 accumulator (docs/gpu.md); {off} or store bf16 weights",
        ),
        "method.name": (
            cfg.method.name != "dense",
            f"gradient-accumulation fusion covers the dense projections only (method={cfg.method.name} trains "
            f"factors through its own autograd Functions); use method=dense or {off}",
        ),
        "precision.fp8_activations": (
            pr.fp8_activations,
            f"the FP8 activation policy saves and multiplies its own operands in the dense layers; {off}",
        ),
        "precision.fp8_gemm": (pr.fp8_gemm, f"FP8 GEMMs replace the dense layers' weight-gradient GEMM; {off}"),
        "optim.in_backward": (
            o.in_backward,
            f"the optimizer in backward reads .grad from autograd's hooks, which fused weights never get; {off}",
        ),
        "parallel.dp_impl": (
            p.dp_impl == "fssdp",
            f"FSSDP reduce-scatters autograd's .grad of its gathered weights; use parallel.dp_impl=allreduce or {off}",
        ),
        "model.moe_experts": (
            cfg.model.moe_experts > 0,
            f"MoE experts are reduced by their own exchange, which reads .grad; use model.moe_experts=0 or {off}",
        ),
        "train.compile": (
            cfg.train.compile,
            "not built for compiled blocks: the fused layer's backward writes main_grad, a Python attribute, which "
            f"dynamo would have to trace into the compiled backward (untested); {off}",
        ),
    }
    for field_name, (bad, message) in why.items():
        if bad:
            raise ConfigError(field_name, message)
