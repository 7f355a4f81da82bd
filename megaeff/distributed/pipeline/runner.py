"""Pipeline parallelism: the executor of GPipe / 1F1B / interleaved 1F1B over this rank's stages (stages.py).

Schedules come from megaeff/distributed/pipeline/schedule.py as an ordered list of (F|B, micro-batch, chunk)
actions per rank. The loop over them is the trainer's one gradient-accumulation loop (megaeff/train/step.py,
`accumulate`), which also runs the plain path's trivial schedule; `PipelineStep` is what an action does here:
a forward of one chunk (receive the activation, compute, send it on) or its backward (receive the gradient,
backward, send the input's gradient back). Why a hand-written executor rather than `torch.distributed.pipelining`:
our stages hold custom layers (tensor-parallel compact factors, FP8 activation autograd functions) and
sequence-parallel activation shapes that its tracer and shape inference would have to be taught; every transfer
must pass through our byte accounting; and gradient reduction must hook into the last backward of each chunk
(megaeff/distributed/data_parallel/bucketed.py). The executor is a hundred lines.

Communication. An activation (or its gradient) of micro-batch i between virtual stages s and s+1 travels from
the rank of s to the rank of s+1 (the same tp/cp/dp coordinates, pp differing) through comm.py's batched
isend/irecv (counted as "pp/p2p_send"), with a tag naming (kind, i, s), so messages match whatever order the
two ranks run their schedules in. Shapes are agreed without handshakes:
every rank holds the same micro-batch (pipeline peers share their dp rank), so the activation is
[batch, seq / cp (/ tp under sequence parallelism), dim] in the residual stream's dtype for everyone (`act_dtype`:
the stored parameters', float32, or bf16 under `precision.param_dtype=bf16`, where the embedding's output and so
every block's output is bf16): the receive buffer must have the sender's dtype (raw bf16 bytes read into a float32
buffer are garbage: NaN losses), and bf16 weights halve the bytes of every transfer. Sends are
asynchronous and waited at the end of the step (`PipelineStep.drain`), so a rank only ever blocks on a receive, and
a deadlock-free schedule (checked by `schedule.simulate`) cannot hang. Time blocked in receives is the measured bubble
(`idle_fraction`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from megaeff.distributed.comm import batch_p2p
from megaeff.distributed.pipeline.schedule import PIPELINE_SCHEDULES, Action, build_schedule
from megaeff.distributed.pipeline.stages import StageChunk
from megaeff.errors import ConfigError

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims


def run_chunk(model: nn.Module, chunk: StageChunk, x, positions=None, segment_ids=None):
    """Tokens (first stage) or the incoming activation -> the activation for the next stage, or logits (last)."""
    if chunk.first:
        x = model.tok_embeddings(x)
    x = model.run_layers(x, [model.layers[k] for k in chunk.layers], positions, segment_ids)
    return model.head(x) if chunk.last else x


class PipelineRunner:
    """Runs this rank's part of one optimizer step (`start_step`) or of one evaluation forward under a schedule."""

    def __init__(
        self,
        model: nn.Module,
        dims: ParallelDims,
        chunks: Sequence[StageChunk],
        *,
        schedule: str = "1f1b",
        virtual: int = 1,
        sequence_parallel: bool = False,
    ):
        if schedule not in PIPELINE_SCHEDULES:
            raise ConfigError(
                "parallel.pp_schedule", f"unknown schedule {schedule!r}; available: {', '.join(PIPELINE_SCHEDULES)}"
            )
        self.model, self.dims, self.chunks = model, dims, list(chunks)
        self.schedule, self.virtual = schedule, virtual
        self.n_stages = dims.pp * virtual
        self.seq_divisor = (dims.tp if sequence_parallel else 1) * dims.cp
        self.cg = dims.comm("pp")
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        self.act_dtype = floats[0] if floats else torch.float32  # module docstring, "Communication"
        self.idle_s = 0.0
        self.step_s = 0.0

    def describe(self) -> str:
        mine = ", ".join(
            f"stage {c.stage}: layers {c.layers[0]}-{c.layers[-1]}" if c.layers else f"stage {c.stage}: no layers"
            for c in self.chunks
        )
        return (
            f"pipeline: {self.schedule} over pp={self.dims.pp}"
            + (f" x {self.virtual} chunks" if self.virtual > 1 else "")
            + f"; this rank {mine}"
        )

    def actions(self, microbatches: int) -> List[Action]:
        """This rank's ordered actions of one optimizer step of `microbatches` micro-batches."""
        return build_schedule(self.schedule, self.dims.pp, microbatches, self.virtual)[self.dims.pp_rank]

    def start_step(
        self, batches: List[Dict], global_tokens: int, loss_fn: Callable, *, to_device: Callable, autocast: Callable
    ) -> "PipelineStep":
        """The executor of one step's actions over `batches` (the step's micro-batches)."""
        self.idle_s = 0.0
        return PipelineStep(self, batches, global_tokens, loss_fn, to_device, autocast)

    # ---------------------------------------------------------------- p2p
    def _tag(self, kind: str, microbatch: int, stage: int) -> int:
        return ((0 if kind == "F" else 1) * self.n_stages + stage) * 1_000_003 + microbatch

    # The peer of virtual stage s is pipeline rank s % pp: its index in this rank's pp group.
    def _send(self, tensor: torch.Tensor, stage: int, tag: int, pending: List) -> None:
        if tensor.dtype != self.act_dtype:  # the peer's buffer has act_dtype: a cast here would round silently
            raise RuntimeError(f"pipeline send of a {tensor.dtype} tensor; the residual stream is {self.act_dtype}")
        pending.append(batch_p2p(self.cg, sends=[(tensor.detach(), stage % self.dims.pp, tag)]))

    def _recv(self, shape, stage: int, tag: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=self.act_dtype, device=self.dims.device)
        t0 = time.perf_counter()
        batch_p2p(self.cg, recvs=[(buf, stage % self.dims.pp, tag)]).wait()
        self.idle_s += time.perf_counter() - t0
        return buf

    def _activation_shape(self, batch) -> Tuple[int, int, int]:
        B, T = batch["inputs"].shape
        return (B, T // self.seq_divisor, self.model.cfg.dim)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def forward_loss(self, batch: Dict, loss_fn: Callable, *, to_device: Callable, autocast: Callable) -> torch.Tensor:
        """One batch through every stage (evaluation); the sum of token losses on the last stage, 0 elsewhere."""
        inputs = to_device(batch)
        pending: List = []
        total = torch.zeros((), dtype=torch.float64)
        for chunk in self.chunks:  # increasing stage order: each waits for its predecessor only
            x = (
                inputs["inputs"]
                if chunk.first
                else self._recv(self._activation_shape(batch), chunk.stage - 1, self._tag("F", 0, chunk.stage))
            )
            with autocast():
                out = run_chunk(self.model, chunk, x, inputs.get("positions"), inputs.get("segment_ids"))
                if chunk.last:
                    total += loss_fn(out, inputs["labels"]).double().cpu()
            if not chunk.last:
                self._send(out, chunk.stage + 1, self._tag("F", 0, chunk.stage + 1), pending)
        for request in pending:
            request.wait()
        return total

    @property
    def idle_fraction(self) -> float:
        """Share of the last step this rank spent blocked on receives: the measured bubble."""
        return self.idle_s / self.step_s if self.step_s > 0 else 0.0


class PipelineStep:
    """This rank's side of one optimizer step: what each of its schedule's actions does (the loop that runs them,
    and the gradient synchronization around their backwards, is megaeff/train/step.py's `accumulate`).

    `loss_sum` is this rank's sum of token losses (non-zero on the last stage only). A pipeline measures no saved
    activation bytes and no MoE balance loss (MoE trains with data parallelism only): both stay 0."""

    def __init__(
        self,
        runner: PipelineRunner,
        batches: List[Dict],
        global_tokens: int,
        loss_fn: Callable,
        to_device: Callable,
        autocast: Callable,
    ):
        self.runner, self.batches, self.global_tokens = runner, batches, global_tokens
        self.loss_fn, self.to_device, self.autocast = loss_fn, to_device, autocast
        self.saved: Dict[Tuple[int, int], Tuple] = {}
        self.pending: List = []
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.act_saved_bytes, self.aux_total = 0, 0.0
        self.t_start = time.perf_counter()

    def forward(self, act: Action) -> None:
        r = self.runner
        chunk, batch = r.chunks[act.chunk], self.batches[act.microbatch]
        inputs = self.to_device(batch)
        if chunk.first:
            x = inputs["inputs"]
        else:
            tag = r._tag("F", act.microbatch, chunk.stage)
            x = r._recv(r._activation_shape(batch), chunk.stage - 1, tag).requires_grad_()
        with self.autocast():
            out = run_chunk(r.model, chunk, x, inputs.get("positions"), inputs.get("segment_ids"))
            if chunk.last:
                loss = self.loss_fn(out, inputs["labels"])
        if chunk.last:
            self.loss_sum += loss.detach().double().cpu()
            out = loss / self.global_tokens
        else:
            r._send(out, chunk.stage + 1, r._tag("F", act.microbatch, chunk.stage + 1), self.pending)
        self.saved[(act.microbatch, act.chunk)] = (x, out)

    def backward(self, act: Action) -> None:
        r = self.runner
        chunk = r.chunks[act.chunk]
        x, out = self.saved.pop((act.microbatch, act.chunk))
        if chunk.last:
            out.backward()
        else:
            grad = r._recv(out.shape, chunk.stage + 1, r._tag("B", act.microbatch, chunk.stage))
            torch.autograd.backward(out, grad)
        if not chunk.first:
            r._send(x.grad, chunk.stage - 1, r._tag("B", act.microbatch, chunk.stage - 1), self.pending)

    def drain(self) -> None:
        """Wait for the sends still in flight; the step's time is then known (`PipelineRunner.idle_fraction`)."""
        for request in self.pending:
            request.wait()
        self.pending = []
        self.runner.step_s = time.perf_counter() - self.t_start
