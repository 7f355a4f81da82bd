"""Pipeline parallelism: the stage split of the LLaMA model and the executor of GPipe / 1F1B / interleaved 1F1B.

Stages. The model's blocks are cut into pp * v virtual stages (v model chunks per rank for the interleaved
schedule); virtual stage s lives on pipeline rank s % pp as its chunk s // pp (Megatron's order), the embedding
with stage 0 and the final norm, head and loss with the last. `prune_to_stages` runs on the meta-built logical
model: this rank keeps only its blocks, still under their logical names (`layers.<i>` in a ModuleDict), so
initialization, tensor parallelism and checkpoints see the same names as in one process and no rank ever
allocates the whole model.

Schedules come from megaeff/distributed/pipeline/schedule.py as an ordered list of (F|B, micro-batch, chunk)
actions per rank; `PipelineRunner` executes this rank's list. Why a hand-written executor rather than
`torch.distributed.pipelining`: our stages hold custom layers (tensor-parallel compact factors, FP8 activation
autograd functions) and sequence-parallel activation shapes that its tracer and shape inference would have to
be taught; every transfer must pass through our byte accounting; and gradient reduction must hook into the last
backward of each chunk (megaeff/distributed/data_parallel/bucketed.py). The executor is a hundred lines.

Communication. An activation (or its gradient) of micro-batch i between virtual stages s and s+1 travels from
the rank of s to the rank of s+1 (the same tp/cp/dp coordinates, pp differing) through comm.py's batched
isend/irecv (counted as "pp/p2p_send"), with a tag naming (kind, i, s), so messages match whatever order the
two ranks run their schedules in. Shapes are agreed without handshakes:
every rank holds the same micro-batch (pipeline peers share their dp rank), so the activation is
[batch, seq / cp (/ tp under sequence parallelism), dim] in float32 for everyone. Sends are asynchronous and waited
at the end of the step, so a rank only ever blocks on a receive, and a deadlock-free schedule (checked by
`pipeline_schedule.simulate`) cannot hang. Time blocked in receives is the measured bubble (`idle_fraction`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from megaeff.distributed.comm import batch_p2p
from megaeff.distributed.pipeline.schedule import build_schedule
from megaeff.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved")


# ------------------------------------------------------------------------------------------------ stage split
def split_layers(n_layers: int, pp: int, virtual: int = 1, boundaries: Sequence[int] = ()) -> List[List[int]]:
    """The block indices of each virtual stage 0 .. pp*virtual-1, in order."""
    stages = pp * virtual
    if boundaries:
        cuts = list(boundaries)
        if len(cuts) != stages - 1:
            raise ConfigError("parallel.pp_boundaries", f"needs {stages - 1} entries for pp={pp} x pp_virtual={virtual} "
                                                        f"stages, got {len(cuts)}")
        if any(not 1 <= c <= n_layers - 1 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ConfigError("parallel.pp_boundaries", f"{cuts} must be strictly increasing layer indices in "
                                                        f"1..{n_layers - 1} (model.n_layers={n_layers})")
    else:
        if n_layers % stages:
            raise ConfigError("parallel.pp", f"model.n_layers={n_layers} does not split evenly into pp={pp} x "
                                             f"pp_virtual={virtual} = {stages} stages; set parallel.pp_boundaries")
        cuts = [n_layers // stages * s for s in range(1, stages)]
    edges = [0, *cuts, n_layers]
    return [list(range(a, b)) for a, b in zip(edges, edges[1:])]


@dataclass(frozen=True)
class StageChunk:
    chunk: int                 # index of this model chunk on its rank
    stage: int                 # virtual stage s = chunk * pp + pp_rank
    layers: Tuple[str, ...]    # keys into the pruned model's `layers` ModuleDict
    first: bool                # holds the embedding
    last: bool                 # holds the final norm, the head and the loss


def stage_chunks(n_layers: int, dims, virtual: int = 1, boundaries: Sequence[int] = ()) -> List[StageChunk]:
    per_stage = split_layers(n_layers, dims.pp, virtual, boundaries)
    n = len(per_stage)
    return [
        StageChunk(c, s, tuple(str(i) for i in per_stage[s]), s == 0, s == n - 1)
        for c, s in enumerate(range(dims.pp_rank, n, dims.pp))
    ]


def prune_to_stages(model: nn.Module, chunks: Sequence[StageChunk]) -> nn.Module:
    """Keep this rank's blocks (by logical index), the embedding on the first stage, norm and head on the last."""
    keep = [int(k) for ch in chunks for k in ch.layers]
    model.layers = nn.ModuleDict({str(i): model.layers[i] for i in keep})
    if not any(ch.first for ch in chunks):
        model.tok_embeddings = None
    if not any(ch.last for ch in chunks):
        model.norm = None
        model.output = None
    return model


def run_chunk(model: nn.Module, chunk: StageChunk, x, positions=None, segment_ids=None):
    """Tokens (first stage) or the incoming activation -> the activation for the next stage, or logits (last)."""
    if chunk.first:
        x = model.tok_embeddings(x)
    x = model.run_layers(x, [model.layers[k] for k in chunk.layers], positions, segment_ids)
    return model.head(x) if chunk.last else x


# ------------------------------------------------------------------------------------------------ executor
class PipelineRunner:
    """Runs this rank's part of one optimizer step (or of one evaluation forward) under a pipeline schedule."""

    def __init__(self, model: nn.Module, dims, chunks: Sequence[StageChunk], *, schedule: str = "1f1b",
                 virtual: int = 1, sequence_parallel: bool = False):
        if schedule not in SCHEDULES:
            raise ConfigError("parallel.pp_schedule", f"unknown schedule {schedule!r}; available: {', '.join(SCHEDULES)}")
        self.model, self.dims, self.chunks = model, dims, list(chunks)
        self.schedule, self.virtual = schedule, virtual
        self.n_stages = dims.pp * virtual
        self.seq_divisor = (dims.tp if sequence_parallel else 1) * dims.cp
        self.cg = dims.comm("pp")
        self.idle_s = 0.0
        self.step_s = 0.0

    def describe(self) -> str:
        mine = ", ".join(f"stage {c.stage}: layers {c.layers[0]}-{c.layers[-1]}" if c.layers else f"stage {c.stage}: no layers"
                         for c in self.chunks)
        return f"pipeline: {self.schedule} over pp={self.dims.pp}" + (f" x {self.virtual} chunks" if self.virtual > 1 else "") + f"; this rank {mine}"

    # ---------------------------------------------------------------- p2p
    def _tag(self, kind: str, microbatch: int, stage: int) -> int:
        return ((0 if kind == "F" else 1) * self.n_stages + stage) * 1_000_003 + microbatch

    # The peer of virtual stage s is pipeline rank s % pp: its index in this rank's pp group.
    def _send(self, tensor: torch.Tensor, stage: int, tag: int, pending: List) -> None:
        pending.append(batch_p2p(self.cg, sends=[(tensor.detach(), stage % self.dims.pp, tag)]))

    def _recv(self, shape, stage: int, tag: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=torch.float32, device=self.dims.device)
        t0 = time.perf_counter()
        batch_p2p(self.cg, recvs=[(buf, stage % self.dims.pp, tag)]).wait()
        self.idle_s += time.perf_counter() - t0
        return buf

    def _activation_shape(self, batch) -> Tuple[int, int, int]:
        B, T = batch["inputs"].shape
        return (B, T // self.seq_divisor, self.model.cfg.dim)

    # ---------------------------------------------------------------- one step
    def train_step(self, batches: List[Dict], global_tokens: int, loss_fn: Callable, *, to_device: Callable,
                   autocast: Callable, reducer=None, on_forward: Optional[Callable] = None) -> torch.Tensor:
        """All forwards and backwards of `batches` (the step's micro-batches); returns this rank's sum of token
        losses (non-zero on the last stage only). Gradients are left accumulated (and handed to `reducer`)."""
        actions = build_schedule(self.schedule, self.dims.pp, len(batches), self.virtual)[self.dims.pp_rank]
        last_backward = max(i for i, a in enumerate(actions) if a.kind == "B")
        saved: Dict[Tuple[int, int], Tuple] = {}
        pending: List = []
        loss_sum = torch.zeros((), dtype=torch.float64)
        self.idle_s, t_start = 0.0, time.perf_counter()
        for i, act in enumerate(actions):
            chunk = self.chunks[act.chunk]
            batch = batches[act.microbatch]
            if act.kind == "F":
                inputs = to_device(batch)
                if chunk.first:
                    x = inputs["inputs"]
                else:
                    x = self._recv(self._activation_shape(batch), chunk.stage - 1, self._tag("F", act.microbatch, chunk.stage)).requires_grad_()
                with autocast():
                    out = run_chunk(self.model, chunk, x, inputs.get("positions"), inputs.get("segment_ids"))
                    if chunk.last:
                        loss = loss_fn(out, inputs["labels"])
                if on_forward is not None:
                    on_forward()
                if chunk.last:
                    loss_sum += loss.detach().double().cpu()
                    out = loss / global_tokens
                else:
                    self._send(out, chunk.stage + 1, self._tag("F", act.microbatch, chunk.stage + 1), pending)
                saved[(act.microbatch, act.chunk)] = (x, out)
            else:
                x, out = saved.pop((act.microbatch, act.chunk))
                if reducer is not None:
                    reducer.prepare(final=i == last_backward)
                if chunk.last:
                    out.backward()
                else:
                    grad = self._recv(out.shape, chunk.stage + 1, self._tag("B", act.microbatch, chunk.stage))
                    torch.autograd.backward(out, grad)
                if not chunk.first:
                    self._send(x.grad, chunk.stage - 1, self._tag("B", act.microbatch, chunk.stage - 1), pending)
        for request in pending:
            request.wait()
        self.step_s = time.perf_counter() - t_start
        return loss_sum

    @torch.no_grad()
    def forward_loss(self, batch: Dict, loss_fn: Callable, *, to_device: Callable, autocast: Callable) -> torch.Tensor:
        """One batch through every stage (evaluation); the sum of token losses on the last stage, 0 elsewhere."""
        inputs = to_device(batch)
        pending: List = []
        total = torch.zeros((), dtype=torch.float64)
        for chunk in self.chunks:  # increasing stage order: each waits for its predecessor only
            x = inputs["inputs"] if chunk.first else self._recv(self._activation_shape(batch), chunk.stage - 1, self._tag("F", 0, chunk.stage))
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
