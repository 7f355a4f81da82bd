"""`parallel`: degrees and implementations, and the checks that need the world size.

`validate_parallel` needs the config only; `validate_world` resolves the degrees for a world size and checks
that the model, sequence and pipeline split over them. Both re-express the rules of the implementation
packages (megaeff.distributed: dims.resolve_degrees, pipeline.split_layers, cp_sharding.check_seq_len,
cp_lightseq.check_lightseq, tensor_parallel.check_tp_layout) with the same messages, so that a bad config is
refused before any of that code (or any process group) runs.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Sequence

from megaeff.config.choices import (
    CpImpl,
    CpSharding,
    DpImpl,
    ExpertImpl,
    FssdpGatherDtype,
    FssdpReduceDtype,
    PpSchedule,
    require_choice,
    require_positive,
)
from megaeff.config.optim import uses_fp8_states
from megaeff.config.train import validate_compile
from megaeff.errors import ConfigError

if TYPE_CHECKING:
    from megaeff.config.schema import Config

AXES = ("tp", "cp", "dp", "pp")  # innermost first, as megaeff.distributed.dims


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
    pp_schedule: PpSchedule = PpSchedule["1f1b"]
    pp_virtual: int = 1
    pp_boundaries: List[int] = field(default_factory=list)
    # Context parallelism (cp > 1): attention over sequence shards by ring | lightseq | ulysses; the sequence is
    # cut zigzag (2 cp chunks, rank r holds r and 2cp-1-r: balanced causal work) or contiguous.
    cp_impl: CpImpl = CpImpl["ring"]
    cp_sharding: CpSharding = CpSharding["zigzag"]
    # Data parallelism: allreduce (replicated parameters, bucketed gradient all-reduce) | fssdp (fully sharded
    # sparse data parallelism: compact parameters, gradients and optimizer state sharded over dp x cp).
    dp_impl: DpImpl = DpImpl["allreduce"]
    # FSSDP: free gathered parameters after forward and gather again for backward (true) or keep them;
    # gather dtype fp32 | bf16 | fp8 (per-group scales); gradient reduce-scatter dtype fp32 | bf16;
    # heterogeneous sharding: tensors with fewer than fssdp_replicate_below elements are replicated within a
    # node of fssdp_node_size ranks and sharded across nodes (0: never / the launcher's local world size).
    fssdp_reshard_after_forward: bool = True
    fssdp_gather_dtype: FssdpGatherDtype = FssdpGatherDtype["fp32"]
    fssdp_reduce_dtype: FssdpReduceDtype = FssdpReduceDtype["fp32"]
    fssdp_replicate_below: int = 0
    fssdp_node_size: int = 0
    # MoE experts over dp x cp: replicated (every rank holds every expert; gradients reduced with the rest),
    # fssdp (each expert's parameters and optimizer state sharded over all ranks, experts materialized each step
    # where the load-proportional placement puts them), or ep (expert e on rank e % dp: fixed placement).
    expert_impl: ExpertImpl = ExpertImpl["replicated"]


def validate_parallel(p: ParallelConfig, cfg: "Config") -> None:
    """World-independent checks; `cfg` (the whole Config) for the choices other sections constrain."""
    degrees = {axis: getattr(p, axis) for axis in AXES}
    wild = [k for k, v in degrees.items() if v == -1]
    if len(wild) > 1:
        raise ConfigError(f"parallel.{wild[1]}", "only one parallel degree may be -1")
    for k, v in degrees.items():
        if v != -1 and v < 1:
            raise ConfigError(f"parallel.{k}", f"must be >= 1 or -1, got {v}")
    require_choice(p.dp_impl, "parallel.dp_impl", DpImpl)
    if p.dp_impl == "fssdp":
        require_choice(p.fssdp_gather_dtype, "parallel.fssdp_gather_dtype", FssdpGatherDtype)
        require_choice(p.fssdp_reduce_dtype, "parallel.fssdp_reduce_dtype", FssdpReduceDtype)
        for key in ("fssdp_replicate_below", "fssdp_node_size"):
            if getattr(p, key) < 0:
                raise ConfigError(f"parallel.{key}", f"must be >= 0, got {getattr(p, key)}")
        if cfg.train.activation_checkpointing:
            raise ConfigError(
                "train.activation_checkpointing",
                "is not supported with parallel.dp_impl=fssdp yet "
                "(FSSDP already frees gathered weights after forward: fssdp_reshard_after_forward)",
            )
    if p.bucket_mb <= 0:
        raise ConfigError("parallel.bucket_mb", f"must be > 0, got {p.bucket_mb}")
    if cfg.model.moe_experts:
        _validate_experts(p, cfg)


def _validate_experts(p: ParallelConfig, cfg) -> None:
    require_choice(p.expert_impl, "parallel.expert_impl", ExpertImpl)
    if p.expert_impl != "replicated" and uses_fp8_states(cfg.optim, cfg.precision):
        raise ConfigError(
            "parallel.expert_impl",
            f"{p.expert_impl} keeps each expert as one flat vector, "
            "whose FP8 groups would straddle its tensors; use optim=adamw or expert_impl=replicated",
        )
    if p.expert_impl != "replicated" and cfg.method.name == "sltrain" and cfg.optim.weight_decay > 0:
        # One flat parameter per layer's experts gets one weight decay; SLTrain's sparse values are 1-D and
        # are not decayed in the single-process model.
        raise ConfigError(
            "parallel.expert_impl",
            f"{p.expert_impl} experts with method=sltrain would "
            "decay the sparse values; set optim.weight_decay=0 or expert_impl=replicated",
        )


# ---------------------------------------------------------------------------------------------- world size
def resolve_degrees(degrees: Dict[str, int], world_size: int) -> Dict[str, int]:
    """Fill in the one degree that may be -1 and check that the product is the world size."""
    degrees = dict(degrees)
    wild = [a for a, d in degrees.items() if d == -1]
    if len(wild) > 1:
        raise ConfigError(f"parallel.{wild[1]}", "only one parallel degree may be -1")
    fixed = 1
    for axis, d in degrees.items():
        if d != -1:
            if d < 1:
                raise ConfigError(f"parallel.{axis}", f"must be >= 1 or -1, got {d}")
            fixed *= d
    if wild:
        if world_size % fixed:
            raise ConfigError(
                f"parallel.{wild[0]}",
                f"world size {world_size} is not divisible by the product of the other degrees ({fixed})",
            )
        degrees[wild[0]] = world_size // fixed
    product = 1
    for d in degrees.values():
        product *= d
    if product != world_size:
        desc = " x ".join(f"{a}={degrees[a]}" for a in AXES)
        raise ConfigError("parallel", f"{desc} = {product} ranks, but the world size is {world_size}")
    return degrees


def validate_world(cfg: "Config", world_size: int) -> Dict[str, int]:
    """The checks that need the world size; returns the resolved degrees {tp, cp, dp, pp}."""
    dims = resolve_degrees({axis: int(getattr(cfg.parallel, axis)) for axis in AXES}, world_size)
    tp, cp, pp = dims["tp"], dims["cp"], dims["pp"]
    if pp > 1:
        _check_pipeline(cfg, pp)
    if cp > 1:
        _check_context_parallel(cfg, tp, cp)
    if cfg.model.moe_experts and (tp > 1 or pp > 1 or cp > 1):
        raise ConfigError(
            "model.moe_experts",
            f"MoE models train with data parallelism only in this build (got tp={tp} cp={cp} pp={pp})",
        )
    _check_tp_layout(cfg, tp)
    validate_compile(cfg, dims)
    return dims


def stage_cuts(n_layers: int, pp: int, virtual: int = 1, boundaries: Sequence[int] = ()) -> List[int]:
    """The first block of every virtual stage but the first: `boundaries` checked, or an even split."""
    stages, cuts = pp * virtual, list(boundaries)
    if cuts:
        if len(cuts) != stages - 1:
            raise ConfigError(
                "parallel.pp_boundaries",
                f"needs {stages - 1} entries for pp={pp} x pp_virtual={virtual} stages, got {len(cuts)}",
            )
        if any(not 1 <= c <= n_layers - 1 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ConfigError(
                "parallel.pp_boundaries",
                f"{cuts} must be strictly increasing layer indices in 1..{n_layers - 1} (model.n_layers={n_layers})",
            )
        return cuts
    if n_layers % stages:
        raise ConfigError(
            "parallel.pp",
            f"model.n_layers={n_layers} does not split evenly into pp={pp} x "
            f"pp_virtual={virtual} = {stages} stages; set parallel.pp_boundaries",
        )
    return [n_layers // stages * s for s in range(1, stages)]


def _check_pipeline(cfg, pp: int) -> None:
    p, n_layers = cfg.parallel, cfg.model.n_layers
    require_choice(p.pp_schedule, "parallel.pp_schedule", PpSchedule)
    require_positive(p.pp_virtual, "parallel.pp_virtual")
    virtual = p.pp_virtual
    if virtual > 1 and p.pp_schedule != "interleaved":
        raise ConfigError(
            "parallel.pp_virtual",
            f"{virtual} model chunks per rank need parallel.pp_schedule=interleaved (got {p.pp_schedule})",
        )
    if p.pp_schedule == "interleaved" and cfg.train.grad_accum % pp:
        raise ConfigError(
            "train.grad_accum",
            f"the interleaved schedule needs the micro-batches per step "
            f"(train.grad_accum={cfg.train.grad_accum}) divisible by parallel.pp={pp}",
        )
    stage_cuts(n_layers, pp, virtual, p.pp_boundaries)


def _check_context_parallel(cfg, tp: int, cp: int) -> None:
    p, m, seq_len = cfg.parallel, cfg.model, cfg.data.seq_len
    require_choice(p.cp_impl, "parallel.cp_impl", CpImpl)
    require_choice(p.cp_sharding, "parallel.cp_sharding", CpSharding)
    if p.cp_impl == "lightseq":
        if p.cp_sharding != "contiguous":
            raise ConfigError(
                "parallel.cp_sharding", f"lightseq balances contiguous shards itself; got sharding={p.cp_sharding!r}"
            )
        if cp % 2:
            raise ConfigError("parallel.cp", f"lightseq's schedule needs an even cp degree, got cp={cp}")
    if cfg.data.reset_attention_mask:
        raise ConfigError(
            "data.reset_attention_mask",
            f"per-document attention masks are not supported under context parallelism (parallel.cp={cp})",
        )
    chunks = 2 * cp if p.cp_sharding == "zigzag" else cp
    if seq_len % chunks:
        why = "2*cp equal chunks" if p.cp_sharding == "zigzag" else "cp equal chunks"
        raise ConfigError(
            "data.seq_len",
            f"sequence length {seq_len} is not divisible by {chunks} ({p.cp_sharding} "
            f"sharding over cp={cp} cuts it into {why})",
        )
    if p.sequence_parallel and tp > 1 and (seq_len // cp) % tp:
        raise ConfigError(
            "data.seq_len",
            f"{seq_len} / cp={cp} is not divisible by tp={tp} "
            "(sequence parallelism shards each context-parallel shard again)",
        )
    if p.cp_impl == "ulysses":
        # Ulysses splits the heads each tensor-parallel rank holds.
        for name, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads or m.n_heads)):
            if (heads // tp) % cp:
                raise ConfigError(
                    name,
                    f"ulysses splits heads over cp: {heads} heads / tp={tp} = "
                    f"{heads // tp} per rank, not divisible by cp={cp}",
                )


def check_tp_layout(model_cfg, tp: int, *, seq_len=None, sequence_parallel: bool = False) -> None:
    """Every shape tensor parallelism splits must divide by tp: heads and kv heads (attention is split by
    heads), hidden and ffn widths, the vocabulary, and with SP the sequence. One ConfigError naming the field,
    raised before any process group is touched."""
    if tp == 1:
        return
    kv = model_cfg.n_kv_heads if model_cfg.n_kv_heads is not None else model_cfg.n_heads
    checks = [
        ("model.n_heads", model_cfg.n_heads),
        ("model.n_kv_heads", kv),
        ("model.dim", model_cfg.dim),
        ("model.ffn_dim", model_cfg.ffn_dim),
        ("model.vocab_size", model_cfg.vocab_size),
    ]
    if sequence_parallel:
        if seq_len is None:
            raise ValueError("check_tp_layout: sequence parallelism needs seq_len")
        checks.append(("data.seq_len", seq_len))
    for field_name, value in checks:
        if value % tp:
            why = " (sequence parallelism shards the sequence)" if field_name == "data.seq_len" else ""
            raise ConfigError(field_name, f"{value} is not divisible by parallel.tp={tp}{why}")


def _check_tp_layout(cfg, tp: int) -> None:
    check_tp_layout(cfg.model, tp, seq_len=cfg.data.seq_len, sequence_parallel=cfg.parallel.sequence_parallel)
