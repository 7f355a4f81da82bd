"""One optimizer step of this rank, from its micro-batches to updated parameters.

`StepRunner.run(batches, step)` is what `Trainer.train_step` does once the batches are chosen, and what the
memory tracker (megaeff/train/memory/) runs on fake tensors, so that both measure and train the same code:

    global token count (dp all-reduce) -> zero_grad -> the accumulation loop (megaeff/train/step.py, plain or
    pipeline schedule) -> loss reduced over pp, cp, dp -> clip by the global norm of the logical gradient ->
    the non-finite check (train.nonfinite) -> optimizer and LR schedule step

With `optim.in_backward=true` the optimizer steps each parameter during the accumulation loop, as its gradient
becomes final, and the clip is per parameter (megaeff/train/in_backward.py); the step's gradient norm is still
the global one, and only the LR schedule steps after the guard.

The per-batch helpers (`to_device`, `loss_sum`, `autocast`) are public because evaluation runs the same forward.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch

from megaeff.config.schema import Config
from megaeff.data.sampler import IGNORE_INDEX
from megaeff.distributed.comm import all_reduce_scalar
from megaeff.distributed.dims import ParallelDims
from megaeff.distributed.grad_norm import clip_grad_norm_
from megaeff.distributed.parallel_model import ParallelModel
from megaeff.distributed.pipeline.runner import PipelineRunner
from megaeff.distributed.pipeline.schedule import Action
from megaeff.distributed.tensor_parallel.sequence import loss_sum
from megaeff.errors import DataError
from megaeff.layers.grad_accum_fusion import grad_of
from megaeff.train.in_backward import InBackwardUpdates
from megaeff.train.nonfinite import NonFiniteGuard
from megaeff.train.step import PlainStep, StepExecutor, accumulate, plain_actions


class StepRunner:
    """Runs the steps of one rank: `parallel` from `parallelize`, the optimizer and LR scheduler built on its
    parameters, the pipeline runner (None without pp) and the non-finite guard."""

    def __init__(
        self,
        cfg: Config,
        dims: ParallelDims,
        parallel: ParallelModel,
        optimizer: torch.optim.Optimizer,
        scheduler,
        pipeline: Optional[PipelineRunner],
        guard: NonFiniteGuard,
    ):
        self.cfg, self.dims, self.parallel = cfg, dims, parallel
        self.model = parallel.module
        self.optimizer, self.scheduler, self.pipeline, self.guard = optimizer, scheduler, pipeline, guard
        self.device = dims.device
        self.in_backward: Optional[InBackwardUpdates] = None
        if cfg.optim.in_backward:
            self.in_backward = InBackwardUpdates(
                optimizer, dims, max_norm=cfg.optim.grad_clip, dp_sharded=parallel.dp_sharded
            )

    # ---------------------------------------------------------------- one batch
    def autocast(self):
        pr = self.cfg.precision
        if pr.name == "bf16" or pr.autocast_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        inputs = batch["inputs"]
        vocab = self.cfg.model.vocab_size
        if int(inputs.max()) >= vocab or int(inputs.min()) < 0:
            raise DataError(
                "data",
                f"token id {int(inputs.max())} is outside model.vocab_size={vocab}; "
                "the dataset was made with a larger tokenizer",
            )
        b = {k: batch[k].to(self.device) for k in ("inputs", "labels", "positions", "segment_ids") if k in batch}
        if self.parallel.context is not None:
            # This rank's tokens of every sequence, with their global positions for RoPE (labels were shifted
            # before sharding, so each token keeps its own target).
            B, T = b["inputs"].shape
            if "positions" not in b:
                b["positions"] = torch.arange(T, device=self.device).expand(B, T)
            b = {k: self.parallel.context.shard(v) for k, v in b.items()}
        return b

    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_sum(logits, labels, self.dims, ignore_index=IGNORE_INDEX)

    def loss_sum(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of token losses of one batch (on a pipeline: on the last stage; 0 on the others)."""
        if self.pipeline is not None:
            return self.pipeline.forward_loss(batch, self.loss_fn, to_device=self.to_device, autocast=self.autocast)
        b = self.to_device(batch)
        kwargs = dict(positions=b.get("positions"), segment_ids=b.get("segment_ids"))
        if self.dims.tp == 1 and getattr(self.model, "fused_loss", False):
            # The head fused with the loss (megaeff/layers/head_loss.py): the same sum, no whole-batch logits.
            with self.autocast():
                return self.model(b["inputs"], labels=b["labels"], ignore_index=IGNORE_INDEX, **kwargs)
        with self.autocast():
            logits = self.model(b["inputs"], **kwargs)
        return self.loss_fn(logits, b["labels"])

    def reduce_loss(self, value: float) -> float:
        """Token-loss sums live on the last pipeline stage (every tp rank there holds the same value), one part
        per sequence shard: summed over pp (the other stages add 0), cp, then dp."""
        stats = self.dims.comm_stats
        for axis in ("pp", "cp", "dp"):
            value = all_reduce_scalar(value, self.dims.group(axis), axis, stats, self.device)
        return value

    # ---------------------------------------------------------------- one step
    def executor(self, batches: List[Dict], global_tokens: int) -> Tuple[StepExecutor, List[Action]]:
        """What runs the step's micro-batches, and its schedule: a pipeline's, or the plain forward+backward."""
        if self.pipeline is not None:
            executor = self.pipeline.start_step(
                batches, global_tokens, self.loss_fn, to_device=self.to_device, autocast=self.autocast
            )
            return executor, self.pipeline.actions(len(batches))
        # The MoE balance loss: the mean over every micro-batch of the global batch (gradients are summed over
        # micro-batches and dp x cp ranks; distributed experts already return this rank's share).
        aux_divisor = len(batches) * (1 if self.parallel.experts_distributed else self.dims.size("dp_cp"))
        executor = PlainStep(self.model, batches, global_tokens, self.loss_sum, aux_divisor=aux_divisor)
        return executor, plain_actions(len(batches))

    def run(self, batches: List[Dict], step: int) -> Dict[str, float]:
        """Train on this rank's micro-batches of global step `step + 1`; returns the step's metrics."""
        stats = self.dims.comm_stats
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        global_tokens = int(all_reduce_scalar(local_tokens, self.dims.group("dp"), "dp", stats, self.device))
        if global_tokens == 0:
            raise RuntimeError(f"step {step}: the global batch has no real tokens")

        self.optimizer.zero_grad(set_to_none=True)
        if self.parallel.context is not None:
            self.parallel.context.counter.reset()
        executor, actions = self.executor(batches, global_tokens)
        if self.in_backward is not None:
            self.in_backward.begin(self.parallel.grad_sync)
        accumulate(actions, executor, self.parallel.grad_sync)  # megaeff/train/step.py
        if self.in_backward is not None:  # updated and clipped per parameter; the norm is the global one
            grad_norm = self.in_backward.end(self.parallel.grad_sync)
        loss_total = self.reduce_loss(float(executor.loss_sum))

        if self.in_backward is None:
            params = [p for p in self.model.parameters() if grad_of(p) is not None]  # main_grad where fused
            max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = clip_grad_norm_(params, max_norm, self.dims, dp_sharded=self.parallel.dp_sharded)
        lr = float(self.scheduler.get_last_lr()[0])  # some optimizers keep lr as a tensor
        if self.guard.admit(step + 1, loss_total / global_tokens, grad_norm):
            if self.in_backward is None:
                self.optimizer.step()
            self.scheduler.step()
        loss_mean = loss_total / global_tokens
        out = {
            "loss": loss_mean,
            "ppl": math.exp(min(loss_mean, 50.0)),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": global_tokens,
            "act_saved_bytes": executor.act_saved_bytes,
        }
        if self.cfg.model.moe_experts:  # the balance loss of the step, summed over its micro-batches and ranks
            out["moe_aux_loss"] = all_reduce_scalar(
                executor.aux_total, self.dims.group("dp_cp"), "dp_cp", stats, self.device
            )
        return out
