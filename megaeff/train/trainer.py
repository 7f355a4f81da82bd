"""The training loop: build everything from the config, run steps, evaluate, checkpoint, stop cleanly.

One step = `grad_accum` micro-batches per data-parallel rank. The loss of every micro-batch is the *sum* of token
losses divided by the number of real (non-pad) tokens in the whole global batch, so accumulating k micro-batches
gives exactly the gradient of one batch k times larger, whatever the padding.

The model comes from `parallelize` (megaeff/distributed/parallelize.py) as a `ParallelModel`: this rank's module,
its gradient sync and its checkpoint view. The micro-batches of a step run through megaeff/train/step.py's one
accumulation loop, under the pipeline's schedule or the plain forward+backward one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megaeff.config import check_tokenizer_vocab, to_plain, to_yaml
from megaeff.config.optim import warmup_steps_for
from megaeff.config.provenance import describe_sources, write_sources
from megaeff.config.schema import Config
from megaeff.data.builder import BuildContext, build_data
from megaeff.data.sampler import IGNORE_INDEX, GlobalSampleOrder, micro_batch_indices
from megaeff.distributed.comm import all_reduce_scalar
from megaeff.distributed.dims import ParallelDims
from megaeff.distributed.parallel_model import ParallelModel
from megaeff.distributed.parallelize import parallelize
from megaeff.distributed.pipeline.runner import PipelineRunner
from megaeff.distributed.pipeline.schedule import bubble_fraction, build_schedule
from megaeff.layers.attention import select_attention
from megaeff.layers.linear import describe_method
from megaeff.layers.sltrain_cost_file import COST_FILE
from megaeff.layers.sltrain_costs import calibrate_paths
from megaeff.models.llama import build_llama, count_params, flops_per_token
from megaeff.optim.builder import build_optimizer
from megaeff.optim.schedule import LRScheduler
from megaeff.precision.fp8_activations import activation_ops
from megaeff.train import backends, nonfinite, resume_policy, watchdog
from megaeff.train import checkpoint as ckpt
from megaeff.train.init_from import load_pretrained, materialization_weights
from megaeff.train.metrics import MetricsLogger
from megaeff.train.perf import peak_flops, peak_memory_bytes, state_memory
from megaeff.train.signals import StopRequest, agreed_stop_reason
from megaeff.train.step_runner import StepRunner


@dataclass
class FitResult:
    step: int
    losses: List[float] = field(default_factory=list)
    final_eval: Optional[Dict] = None
    preempted: bool = False
    checkpoint: Optional[Path] = None


def perplexity(total_nll: float, total_tokens: int) -> float:
    """Token-weighted: exp of the mean loss over all tokens, not the mean of per-batch means."""
    if total_tokens <= 0:
        raise ValueError("perplexity of zero tokens")
    return math.exp(total_nll / total_tokens)


def padding_batch(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A batch shaped like `batch` whose every label is ignored: it runs the forward's collectives and counts
    neither loss nor tokens."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims, run_dir: Path, *, stop: Optional[StopRequest] = None):
        self.cfg = cfg
        self.dims = dims
        self.run_dir = Path(run_dir)
        if dims.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop = stop or StopRequest()
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        seed_everything(t.seed, t.deterministic)

        # The config was validated once, by to_config and validate_world (the CLI); only the data is new here.
        self.device = dims.device
        self.data = self._build_data()
        self.parallel = self._build_model()
        self.model = self.parallel.module
        self.pipeline = self._build_pipeline()
        self.peak_flops = peak_flops(self.device, cfg.logging.peak_tflops)
        # Built on the parameters parallelize left (FSSDP's shards).
        self.optimizer, self.optim_impl = build_optimizer(
            self.model, cfg.optim, self.device, cfg.precision, seed=t.seed
        )
        self.scheduler = LRScheduler(
            self.optimizer, t.steps, warmup_steps_for(cfg.optim, t.steps), cfg.optim.min_lr_ratio, cfg.optim.schedule
        )
        self.nonfinite = nonfinite.NonFiniteGuard(t.nonfinite, t.nonfinite_max_consecutive)
        self.runner = StepRunner(
            cfg, dims, self.parallel, self.optimizer, self.scheduler, self.pipeline, self.nonfinite
        )
        self.watchdog = watchdog.HangWatchdog(t.hang_timeout_s, self.run_dir, dims.rank)  # the CLI runs fit() in it
        # The datasets are already shuffled; the order only wraps to the start if a resumed run outlives the plan.
        self.order = GlobalSampleOrder(len(self.data.train), t.seed, shuffle=False)
        self.step = 0
        self.consumed_samples = 0
        self.resume_notes: List[str] = []  # how the new config differs from the checkpoint's (resume_policy.py)
        # Sharded (DCP) checkpoints, synchronous or written in the background (megaeff/train/checkpoint/).
        self.checkpointer = ckpt.Checkpointer(
            self.run_dir / "checkpoints",
            rank=dims.rank,
            world_size=dims.world_size,
            keep_last=t.keep_last,
            async_save=t.async_checkpoint,
            log=lambda line: self.log.info(line),
        )
        self.resumed_from = self._resume()
        self.log = MetricsLogger(
            self.run_dir,
            cfg.logging,
            enabled=dims.is_main,
            total_steps=t.steps,
            start_step=self.step,
            run_name=cfg.name,
            config=to_plain(cfg),
        )
        self._announce()
        # What accelerators were found and used, printed once and kept in the run dir (megaeff/train/backends.py).
        usage = backends.usage_of(cfg, self.device, self.model.attention_backend, self.act_ops, self.optimizer)
        self.backends = backends.build_report(usage, backends.probe(self.device))
        for line in self.backends.lines():
            self.log.info(line)
        if dims.is_main:
            backends.write_report(self.backends, self.run_dir)
            write_sources(cfg.optim, self.run_dir)  # optim_sources.json: each optimizer value and its source
        if cfg.model.init_from and self.resumed_from is None:  # megaeff/train/init_from.py
            load_pretrained(cfg, self.parallel, dims, self.run_dir, self.log.info)

    # ---------------------------------------------------------------- construction
    def _build_data(self):
        t = self.cfg.train
        barrier = torch.distributed.barrier if self.dims.world_size > 1 else (lambda: None)
        # Sized for the planned run (steps x global batch samples), as Megatron's train_samples.
        ctx = BuildContext(t.steps * self.global_batch_size, t.seed, self.dims.is_main, barrier)
        data = build_data(self.cfg.data, ctx)
        check_tokenizer_vocab(self.cfg.model, data.tokenizer.vocab_size)
        return data

    def _build_model(self) -> ParallelModel:
        """The logical model on the meta device, measured, then this rank's part of it (megaeff/distributed/
        parallelize.py: layout, materialization, data parallelism)."""
        cfg, t = self.cfg, self.cfg.train
        self.act_ops = activation_ops(cfg.precision)
        model = build_llama(cfg.model, cfg.method, device="meta", act=self.act_ops)
        # Sizes and work of the logical model (every rank the same), before it is split across ranks.
        self.n_params = count_params(model)
        self.tokens_per_call = t.micro_batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(model, cfg.data.seq_len, self.tokens_per_call)
        self.method_summary = describe_method(model, self.tokens_per_call)
        self.logical_keys = list(model.state_dict().keys())
        model.attention_backend = select_attention(cfg.model.attention_backend, self.device)
        parallel = parallelize(model, self.dims, cfg, init_weights=materialization_weights(cfg))
        me = cfg.method
        if me.name == "sltrain" and me.sltrain_costs == "measured" and me.sltrain_path == "auto":
            # Every rank, at the same point: rank 0 reads each distinct shape's cost from the run dir's file or times
            # it, and broadcasts (sltrain_costs.py): a resumption into this run dir takes this run's paths.
            calibrate_paths(parallel.module, self.tokens_per_call, cache=self.run_dir / COST_FILE)
        return parallel

    def _build_pipeline(self) -> Optional[PipelineRunner]:
        if self.dims.pp == 1:
            return None
        pc = self.cfg.parallel
        return PipelineRunner(
            self.model,
            self.dims,
            self.parallel.chunks,
            schedule=pc.pp_schedule,
            virtual=pc.pp_virtual,
            sequence_parallel=pc.sequence_parallel and self.dims.tp > 1,
        )

    def _resume(self) -> Optional[Path]:
        """Load the checkpoint `train.resume` names, if any; returns its directory."""
        # Verified; a corrupt or unusable `latest` falls back to the newest checkpoint that verifies (logged).
        resume_dir, self.checkpoint_notes = ckpt.resolve_resume(
            self.run_dir,
            self.cfg.train.resume,
            rank=self.dims.rank,
            world_size=self.dims.world_size,
            group=self.checkpointer.group,
        )
        if resume_dir is not None:
            self.resume_notes = resume_policy.check_resume_config(resume_dir, to_yaml(self.cfg))  # or refuses
            fresh = resume_policy.optimizer_hparams(self.optimizer)
            state = ckpt.load_checkpoint(
                resume_dir,
                model=self.model,
                optimizer=self.optimizer,
                rank=self.dims.rank,
                logical=self.parallel.state,
                expected_keys=self.logical_keys if self.dims.pp > 1 else None,
                world_size=self.dims.world_size,
                group=self.checkpointer.group,
                verify=False,  # resolve_resume just did
            )
            resume_policy.override_hparams(self.optimizer, fresh)  # the new config's LR, betas, ... win
            self.step = int(state["step"])
            self.consumed_samples = int(state["consumed_samples"])
            self.scheduler.load_state_dict(state["scheduler"])
        return resume_dir

    # ---------------------------------------------------------------- helpers
    @property
    def global_batch_size(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * self.dims.dp * t.grad_accum

    def _announce(self) -> None:
        c = self.cfg
        lines = [
            f"megaeff: run dir {self.run_dir}",
            f"data: {self.data.description}"
            + (f"; {self.data.baseline_name} ppl {self.data.unigram_ppl:.2f}" if self.data.unigram_ppl else ""),
            f"model: {c.model.name} ({self.n_params / 1e6:.2f}M params, "
            f"{self.flops_per_token / 1e6:.2f} MFLOPs/token), attention {self.model.attention_backend.name}, "
            f"optimizer {type(self.optimizer).__name__} ({self.optim_impl}), precision {c.precision.name}",
            f"method: {self.method_summary}; activations saved for backward: {self.act_ops.name}",
            f"layout: tp={self.dims.tp} cp={self.dims.cp} dp={self.dims.dp} pp={self.dims.pp} on {self.device}; "
            f"global batch {self.global_batch_size} x {c.data.seq_len} tokens "
            f"(micro {c.train.micro_batch_size} x dp {self.dims.dp} x accum {c.train.grad_accum})"
            + ("; sequence parallel" if self.dims.tp > 1 and c.parallel.sequence_parallel else ""),
            self.parallel.grad_sync.describe(),
        ]
        lines += describe_sources(c.optim)  # lr, clipping, ...: command line, experiment, method or optim default
        if self.runner.in_backward is not None:
            lines.append(self.runner.in_backward.describe())
        if self.pipeline is not None:
            m, pc = c.train.grad_accum, c.parallel
            bubble = bubble_fraction(
                build_schedule(pc.pp_schedule, self.dims.pp, m, pc.pp_virtual), self.dims.pp, pc.pp_virtual
            )
            lines.append(
                f"{self.pipeline.describe()}; {m} micro-batches per step, bubble {bubble:.3f} of compute by the "
                "schedule (tools/pipeline_schedule.py draws it; pp_idle_fraction in the metrics is measured)"
            )
        lines += self.checkpoint_notes
        if self.resumed_from is not None:
            lines.append(
                f"resumed from {self.resumed_from} at step {self.step} ({self.consumed_samples} samples consumed)"
            )
            lines += self.resume_notes
        for line in lines:
            self.log.info(line)

    # ---------------------------------------------------------------- step
    def train_step(self) -> Dict[str, float]:
        t = self.cfg.train
        batches = [
            self.data.train.batch(ix)
            for ix in micro_batch_indices(
                self.order, self.consumed_samples, t.micro_batch_size, self.dims.dp, self.dims.dp_rank, t.grad_accum
            )
        ]
        out = self.runner.run(batches, self.step)  # megaeff/train/step_runner.py
        self.step += 1
        self.consumed_samples += self.global_batch_size
        return out

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        t = self.cfg.train
        valid = self.data.valid
        n_batches = math.ceil(len(valid) / t.eval_batch_size)
        if t.eval_max_batches is not None:
            n_batches = min(n_batches, t.eval_max_batches)
        self.model.eval()
        nll = torch.zeros((), dtype=torch.float64)
        tokens = 0
        # Batches are dealt round-robin over dp ranks, then the sums are reduced: the result is independent of dp.
        # Every rank runs the same number of forwards, because a forward may hold dp collectives (FSSDP gathers,
        # the sparse embedding's all-to-all, expert exchanges): a rank whose share ran out runs a padding batch
        # whose labels are all ignored, so it adds no loss and no tokens.
        dp = self.dims.dp
        for b in range(self.dims.dp_rank, math.ceil(n_batches / dp) * dp, dp):
            if b < n_batches:
                lo = b * t.eval_batch_size
                batch = valid.batch(range(lo, min(lo + t.eval_batch_size, len(valid))))
            else:
                batch = padding_batch(valid.batch(range(1)))
            nll += self.runner.loss_sum(batch).double().cpu()
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            self.watchdog.beat("an evaluation batch")
        self.model.train()
        nll_total = self.runner.reduce_loss(float(nll))
        tok_total = int(all_reduce_scalar(tokens, self.dims.group("dp"), "dp", self.dims.comm_stats, self.device))
        return {"val_loss": nll_total / tok_total, "val_ppl": perplexity(nll_total, tok_total), "val_tokens": tok_total}

    # ---------------------------------------------------------------- checkpoint
    def save(self) -> Path:
        nonfinite.check_state_finite(self.model, self.optimizer, self.dims, self.step)  # never a non-finite `latest`
        self.watchdog.beat(f"step {self.step}, starting its checkpoint")
        return self.checkpointer.save(
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            trainer_state={
                "step": self.step,
                "consumed_samples": self.consumed_samples,
                "scheduler": self.scheduler.state_dict(),
            },
            config_yaml=to_yaml(self.cfg),
            logical=self.parallel.state,  # each rank writes its own shards
        )

    # ---------------------------------------------------------------- loop
    def _train_record(self, m: Dict[str, float], tokens_per_s: float, step_time: float) -> Dict[str, float]:
        stats = self.dims.comm_stats
        return {
            "loss": m["loss"],
            "ppl": m["ppl"],
            "lr": m["lr"],
            "grad_norm": m["grad_norm"],
            "act_saved_bytes": m["act_saved_bytes"],  # max over the step's micro-batches
            **({"moe_aux_loss": m["moe_aux_loss"]} if "moe_aux_loss" in m else {}),
            **({"pp_idle_fraction": self.pipeline.idle_fraction} if self.pipeline is not None else {}),
            # Attention forwards that computed, and those the checkpoint recomputation replayed (LightSeq).
            **(
                {f"cp_attention/{k}": v for k, v in self.parallel.context.counter.as_dict().items()}
                if self.parallel.context is not None
                else {}
            ),
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.dims.world_size),
            "consumed_samples": self.consumed_samples,
            "nonfinite_skips": self.nonfinite.skipped,  # updates dropped so far in this process (train.nonfinite=skip)
            # Bytes of the last step's collectives (including the stop-flag agreement), total and by group/kind.
            "comm_bytes": stats.total(),
            **{f"comm_bytes/{key}": n for key, n in stats.snapshot().items()},
            "peak_mem_bytes": peak_memory_bytes(self.device),
            **state_memory(self.model, self.optimizer),
        }

    def fit(self) -> FitResult:
        """Train to `train.steps`, or until a stop is requested (signal, wall time, `train.exit_interval`)."""
        t = self.cfg.train
        result = FitResult(step=self.step)
        started = time.monotonic()
        window_tokens, window_time, window_steps = 0, 0.0, 0
        last_saved = self.step if self.resumed_from is not None else None
        while self.step < t.steps:
            self.dims.comm_stats.reset()
            t0 = time.perf_counter()
            m = self.train_step()
            dt = time.perf_counter() - t0
            self.watchdog.beat(f"step {self.step}")
            reason = (
                agreed_stop_reason(self.stop, t, self.step, started, self.dims, self.device)
                if self.step < t.steps
                else None
            )
            result.losses.append(m["loss"])
            window_tokens, window_time, window_steps = window_tokens + m["tokens"], window_time + dt, window_steps + 1
            self.log.tick(self.step, m["loss"], m["tokens"] / dt)
            if self.step % t.log_interval == 0 or self.step == t.steps:
                self.log.log_train(
                    self.step, self._train_record(m, window_tokens / window_time, window_time / window_steps)
                )
                window_tokens, window_time, window_steps = 0, 0.0, 0
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.steps:
                self.log.log_eval(self.step, self.evaluate())
            if t.ckpt_interval and self.step % t.ckpt_interval == 0:
                result.checkpoint = self.save()
                last_saved = self.step
            if reason is not None:
                if last_saved != self.step:
                    result.checkpoint = self.save()
                self.checkpointer.wait()  # an asynchronous save completes (and `latest` moves) before the exit
                self.log.info(
                    f"stop requested ({reason}): checkpoint saved at step {self.step}; resume with train.resume=auto"
                )
                result.preempted = True
                break
        result.step = self.step
        if self.step >= t.steps and not result.preempted:
            result.final_eval = self.evaluate()
            self.log.log_eval(self.step, result.final_eval)
            if t.ckpt_interval and last_saved != self.step:
                result.checkpoint = self.save()
        self.checkpointer.wait()
        return result

    def close(self) -> None:
        self.checkpointer.close()  # fit() waited; after an error a background write is joined, not published
        self.log.close()
