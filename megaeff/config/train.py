"""`train` and `logging`: the loop, its checkpoints and what it reports."""

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

from megaeff.config.choices import LoggingBackend, NonfinitePolicy, WandbMode, require_choice, require_positive
from megaeff.errors import ConfigError

if TYPE_CHECKING:
    from megaeff.config.schema import Config

# The devices a run can use (resolve_device in megaeff/distributed/dims.py turns auto and cuda into one).
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


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
    # Stage a copy of this rank's shards and write the checkpoint in a background thread while training goes on
    # (megaeff/train/checkpoint/async_save.py); `latest` moves once the write is complete.
    async_checkpoint: bool = False
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
    # A step whose loss or gradient norm is NaN/inf: stop (exit EXIT_NONFINITE naming the step, nothing saved from
    # the bad state) or skip (drop the update, count it in the metrics; stop after nonfinite_max_consecutive in a row).
    nonfinite: NonfinitePolicy = NonfinitePolicy["stop"]
    nonfinite_max_consecutive: int = 5
    # Seconds a collective may wait for the other ranks before it fails (the process group's timeout).
    collective_timeout_s: float = 1800.0
    # Watchdog: when no step, evaluation batch or checkpoint completes within this many seconds, every rank dumps its
    # Python stacks to <run_dir>/hang_rank<r>.txt and exits with EXIT_HUNG; null disables. Below
    # collective_timeout_s, so that the stacks are dumped before a collective times out.
    hang_timeout_s: Optional[float] = 1200.0
    # torch.compile (inductor) of every transformer block's forward (megaeff/distributed/compile.py): single
    # process or plain data parallelism; compiles on the first step (tens of seconds on CPU, needs a C++ compiler).
    compile: bool = False


def validate_compile(cfg: "Config", degrees: Dict[str, int]) -> None:
    """`train.compile=true` with what megaeff/distributed/compile.py does not support: one ConfigError."""
    if not cfg.train.compile:
        return
    refused = [f"parallel.{axis}={degrees[axis]}" for axis in ("tp", "cp", "pp") if degrees[axis] > 1]
    if cfg.parallel.dp_impl == "fssdp" and degrees["dp"] * degrees["cp"] > 1:
        refused.append("parallel.dp_impl=fssdp")
    if cfg.model.moe_experts:
        refused.append("model.moe_experts")
    if cfg.precision.fp8_activations or cfg.precision.fp8_gemm:
        refused.append("precision.fp8_activations/fp8_gemm")
    if refused:
        raise ConfigError(
            "train.compile",
            f"compiled blocks run single-process or with plain data parallelism in this build; not with "
            f"{', '.join(refused)} (set train.compile=false)",
        )


def validate_train(t: TrainConfig) -> None:
    for name in ("steps", "micro_batch_size", "grad_accum", "log_interval", "eval_batch_size", "keep_last"):
        require_positive(getattr(t, name), f"train.{name}")
    for name in ("eval_interval", "ckpt_interval", "exit_interval"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}", "must be >= 0 (0 disables)")
    if t.eval_max_batches is not None:
        require_positive(t.eval_max_batches, "train.eval_max_batches")
    if t.max_duration_minutes is not None:
        require_positive(t.max_duration_minutes, "train.max_duration_minutes")
    if t.threads is not None:
        require_positive(t.threads, "train.threads")
    if not 0 <= t.seed < 2**32:  # numpy's generators take 32-bit seeds
        raise ConfigError("train.seed", f"must be in [0, 2**32), got {t.seed}")
    if not DEVICE.fullmatch(t.device):
        raise ConfigError("train.device", f"must be auto, cpu, cuda or cuda:<index>, got {t.device!r}")
    require_choice(t.nonfinite, "train.nonfinite", NonfinitePolicy)
    require_positive(t.nonfinite_max_consecutive, "train.nonfinite_max_consecutive")
    require_positive(t.collective_timeout_s, "train.collective_timeout_s")
    if t.hang_timeout_s is not None:
        require_positive(t.hang_timeout_s, "train.hang_timeout_s")


@dataclass
class LoggingConfig:
    # console+jsonl always; wandb additionally when backend=wandb.
    backend: LoggingBackend = LoggingBackend["jsonl"]
    progress: bool = True
    wandb_project: str = "megaeff"
    wandb_entity: Optional[str] = None
    # offline unless the user asks for online explicitly.
    wandb_mode: WandbMode = WandbMode["offline"]
    # Peak FLOP/s per device for MFU; null looks the device up (estimated on CPU).
    peak_tflops: Optional[float] = None


def validate_logging(lg: LoggingConfig) -> None:
    require_choice(lg.backend, "logging.backend", LoggingBackend)
    require_choice(lg.wandb_mode, "logging.wandb_mode", WandbMode)
    if lg.peak_tflops is not None:
        require_positive(lg.peak_tflops, "logging.peak_tflops")
