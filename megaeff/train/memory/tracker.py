"""Peak live tensor bytes of one training step, with the breakdown at the peak, from a `TorchDispatchMode`.

    tracker = StepMemoryTracker(model, optimizer)
    with tracker:
        runner.run(batches, step)
    report = tracker.report()   # peak bytes, breakdown by category at the peak, the phase of the peak

What is counted. Every tensor an op returns keeps a storage alive; the tracker holds a weak reference to each
storage it has seen and counts its bytes once (views share their storage) until the storage dies. The model's
parameters and buffers and the optimizer's state are counted from the start. A storage resized in place
(FSSDP frees and re-grows its gathered parameters with `UntypedStorage.resize_`, which no dispatch mode sees) is
followed by wrapping `resize_` while the tracker is active, as torch's own MemTracker does. The peak is taken
after each op, so it is the peak of live tensor bytes (what the caching allocator must at least hold), not of
the allocator: no rounding, no kernel workspaces, no allocator cache.

Categories (`CATEGORIES`), each storage in exactly one, the first that applies:
parameters and buffers (the model's, at the start), gradients (a parameter's `.grad`, or the gradient a leaf
receives), optimizer state (`optimizer.state` tensors), communication buffers (storages a collective reads or
writes: c10d ops), activations saved for backward (made during a forward and still alive when that forward
ends, i.e. when its backward or the next phase begins: what autograd and the loss keep for backward; under
activation checkpointing the block inputs), temporaries (the rest: forward scratch, everything the backward
makes, recomputed activations included, the optimizer's scratch).

Cost. Each op costs O(its outputs); categories are attached to storages when they become known (a storage
becoming `p.grad`, optimizer state after the step) and the breakdown at the peak is computed once at the end
from a log of (storage, bytes, birth, death) spans, so the whole run is O(ops + storages), never O(ops x live).

Why not torch's `torch.distributed._tools.mem_tracker.MemTracker` itself: it files everything a forward makes
as "activations" (forward scratch included), has no communication category, and cannot say which phase held the
peak; its peak is the same quantity and serves as the independent reference of tools/bench/memory_validate.py.
Saved tensors are defined by survival rather than by `saved_tensors_hooks`, because the trainer's own step
already installs such hooks (megaeff/precision/saved_bytes.py, in PlainStep.forward) and only the innermost
pair of hooks runs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megaeff.layers.grad_accum_fusion import grad_of
from megaeff.train.memory.fake_ops import all_real, mirror_collective, sparse_stand_in, storage_parts

CATEGORIES = ("parameters", "buffers", "gradients", "optimizer_state", "comm_buffers", "activations", "temporaries")
_RANK = {c: i for i, c in enumerate(CATEGORIES)}
_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")


class _Storage:
    """One storage seen by the tracker: its explicit category (None until known) and where it was born."""

    __slots__ = ("category", "forward", "survived", "nbytes", "alive", "origin")

    def __init__(self, forward: Optional[int], nbytes: int, origin: str):
        self.category: Optional[str] = None
        self.origin = origin  # "<phase>: <op>" that made it
        self.nbytes = nbytes  # its current size
        self.alive = True
        self.forward = forward  # index of the forward phase it was born in, else None
        self.survived = False  # still alive when its forward ended

    def tag(self, category: str) -> None:
        if self.category is None or _RANK[category] < _RANK[self.category]:
            self.category = category

    def resolved(self) -> str:
        if self.category is not None:
            return self.category
        return "activations" if self.survived else "temporaries"


@dataclass
class _Span:
    storage: _Storage
    nbytes: int
    birth: int
    death: Optional[int] = None


@dataclass
class MemoryReport:
    peak_bytes: int
    breakdown: Dict[str, int]  # bytes by category at the peak (sums to peak_bytes)
    phase: str  # forward / backward / clip / optimizer / ... at the peak
    microbatch: int  # the forward or backward index of the peak (0-based; -1 outside them)
    final_bytes: int  # live bytes when the tracker stopped
    final_breakdown: Dict[str, int]  # ... by category
    saved_per_forward: List[int]  # bytes each forward left alive for its backward (saved tensors and the loss)
    largest: List[Dict[str, object]]  # the largest non-state storages at the peak and what made them
    ops: int
    storages: int
    extra: Dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_gb": self.peak_bytes / 1e9,
            "peak_gib": self.peak_bytes / 2**30,
            "breakdown": dict(self.breakdown),
            "phase": self.phase,
            "microbatch": self.microbatch,
            "final_bytes": self.final_bytes,
            "final_breakdown": dict(self.final_breakdown),
            "saved_per_forward": list(self.saved_per_forward),
            "largest_at_peak": list(self.largest),
            "ops": self.ops,
            "storages": self.storages,
            **self.extra,
        }


def _storage_of(t: torch.Tensor) -> Optional[torch.UntypedStorage]:
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class StepMemoryTracker(TorchDispatchMode):
    """Live tensor bytes of everything run inside it (module docstring). `model`, `optimizer`: what exists before
    the step and is counted from the start (parameters, buffers, optimizer state); `fake_reads`: answer the
    reads of fake tensors' values a step makes (`int(x)`, `float(x)`, `bool(x)`) with 1, so that a step on fake
    tensors passes its Python checks (token counts, the loss and the gradient norm given to the non-finite
    guard); no allocation of the step depends on those values."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, fake_reads=False):
        super().__init__()
        self.model, self.optimizer, self.fake_reads = model, optimizer, fake_reads
        self._live: Dict[int, _Span] = {}  # storage key -> its current span
        self._spans: List[_Span] = []
        self._refs: Dict[int, weakref.ref] = {}
        self.clock = 0
        self.live_bytes = 0
        self.peak_bytes, self.peak_clock, self.peak_phase, self.peak_index = 0, -1, "setup", -1
        self.phase, self.forwards, self.backwards, self.optimizer_steps = "setup", 0, 0, 0
        self._forward_born: List[_Storage] = []  # the storages the current forward made
        self.saved_per_forward: List[int] = []
        self._phases_after: List[str] = []  # the phases seen, in order, to name "after backward" at the end
        self._handles: list = []
        self._orig_resize = None
        self._op = "start"  # the op being recorded, for each storage's origin

    # ------------------------------------------------------------------ storages
    def _key(self, st: torch.UntypedStorage) -> int:
        return st._cdata

    def _see(self, st: torch.UntypedStorage) -> _Storage:
        key = self._key(st)
        span = self._live.get(key)
        if span is not None:
            return span.storage
        origin = f"{self.phase}: {self._op}"
        info = _Storage(self.forwards - 1 if self.phase == "forward" else None, st.nbytes(), origin)
        if info.forward is not None:
            self._forward_born.append(info)
        self._open(key, info, st.nbytes())
        self._refs[key] = weakref.ref(st, lambda _, key=key: self._died(key))
        return info

    def _open(self, key: int, info: _Storage, nbytes: int) -> None:
        span = _Span(info, nbytes, self.clock)
        self._live[key] = span
        self._spans.append(span)
        self.live_bytes += nbytes

    def _close(self, key: int) -> Optional[_Span]:
        span = self._live.pop(key, None)
        if span is not None:
            span.death = self.clock
            self.live_bytes -= span.nbytes
        return span

    def _died(self, key: int) -> None:
        span = self._close(key)
        if span is not None:
            span.storage.alive = False
        self._refs.pop(key, None)

    def _resized(self, st: torch.UntypedStorage) -> None:
        key = self._key(st)
        span = self._close(key)
        if span is None:
            self._see(st)
        else:
            span.storage.nbytes = st.nbytes()
            self._open(key, span.storage, st.nbytes())
        self._tick()

    def tag(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        for t in tensors:
            st = _storage_of(t)
            if st is not None:
                self._see(st).tag(category)

    # ------------------------------------------------------------------ phases
    def _enter_phase(self, phase: str) -> None:
        if phase == self.phase:
            return
        if self.phase == "forward":
            self._end_forward()
        if self.phase == "backward":
            self._tag_grads()
        if phase == "forward":
            self.forwards += 1
        elif phase == "backward":
            self.backwards += 1
        self.phase = phase
        self._phases_after.append(phase)

    def _end_forward(self) -> None:
        survived = 0
        for info in self._forward_born:
            if info.alive:
                info.survived = True
                survived += info.nbytes
        self._forward_born = []
        self.saved_per_forward.append(survived)

    def _tag_grads(self) -> None:
        grads = [grad_of(p) for p in self.model.parameters()]  # a fused weight's is its fp32 main_grad
        self.tag([g for g in grads if g is not None], "gradients")

    def _tag_optimizer_state(self) -> None:
        if self.optimizer is None:
            return
        for state in self.optimizer.state.values():
            self.tag([t for t in tree_leaves(state) if isinstance(t, torch.Tensor)], "optimizer_state")

    def _forward_pre_hook(self, module, args) -> None:
        if torch._C._current_autograd_node() is None and self.phase != "optimizer":
            self._enter_phase("forward")

    def _opt_pre_hook(self, optimizer, args, kwargs) -> None:
        self._tag_grads()
        self._enter_phase("optimizer")

    def _opt_post_hook(self, optimizer, args, kwargs) -> None:
        self.optimizer_steps += 1
        self._tag_optimizer_state()
        self._enter_phase("after_optimizer")

    def _grad_hook(self, grad: torch.Tensor) -> None:
        self.tag([grad], "gradients")

    # ------------------------------------------------------------------ the mode
    def _tick(self) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_clock, self.peak_phase = self.live_bytes, self.clock, self.phase
            self.peak_index = {"forward": self.forwards, "backward": self.backwards}.get(self.phase, 0) - 1
            self._peak_position = len(self._phases_after)
        self.clock += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._current_autograd_node() is not None:
            self._enter_phase("backward")
        elif self.phase == "backward":
            self._enter_phase("after_backward")
        if self.fake_reads:
            if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
                return True if args[0].dtype == torch.bool else 1
            if all_real(args, kwargs):
                return self._run_real(func, args, kwargs)
            handled, out = sparse_stand_in(func, args, kwargs)
            if handled:
                self._record(func, args, kwargs, out)
                return out
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        self._op = str(func)
        if func.namespace in _COLLECTIVE_NAMESPACES:
            self.tag([t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)], "comm_buffers")
        for t in tree_leaves(out):
            for part in storage_parts(t, func):
                st = _storage_of(part)
                if st is not None:
                    self._see(st)
        self._tick()

    def _run_real(self, func, args, kwargs):
        """An op on real tensors only (the batch's token ids and what the step derives from them, e.g. FSSDP's
        sparse-embedding routing) computes real values; collectives among them follow `_mirror`."""
        with unset_fake_temporarily():
            out = func(*args, **kwargs)
            if func.namespace in _COLLECTIVE_NAMESPACES:
                mirror_collective(func, args)
        self._record(func, args, kwargs, out)
        return out

    def __enter__(self):
        self.tag(self.model.parameters(), "parameters")
        self.tag(self.model.buffers(), "buffers")
        self._tag_optimizer_state()
        self._tick()
        hooks = [nn.modules.module.register_module_forward_pre_hook(self._forward_pre_hook)]
        if self.optimizer is not None:
            hooks.append(self.optimizer.register_step_pre_hook(self._opt_pre_hook))
            hooks.append(self.optimizer.register_step_post_hook(self._opt_post_hook))
        hooks += [p.register_hook(self._grad_hook) for p in self.model.parameters() if p.requires_grad]
        self._handles = hooks
        self._orig_resize = torch.UntypedStorage.resize_
        orig, tracker = self._orig_resize, self

        def resize_(st, size):  # not a dispatch op: FSSDP's free / re-grow of gathered parameters
            result = orig(st, size)
            tracker._resized(st)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        # Per-parameter updates in backward (optim.in_backward) make state without the facade's step hooks.
        self._tag_grads()
        self._tag_optimizer_state()
        torch.UntypedStorage.resize_ = self._orig_resize
        for h in self._handles:
            h.remove()
        self._handles = []
        self._enter_phase("done")
        return super().__exit__(*exc)

    # ------------------------------------------------------------------ result
    def _phase_name(self) -> str:
        """`after_backward` is clipping when no forward follows it before the optimizer, else the gap between
        micro-batches."""
        if self.peak_phase != "after_backward":
            return self.peak_phase
        later = self._phases_after[getattr(self, "_peak_position", 0) :]
        return "between_microbatches" if "forward" in later else "clip"

    def _live_at(self, k: int) -> List[_Span]:
        return [s for s in self._spans if s.birth <= k and (s.death is None or s.death > k)]

    def breakdown_at(self, k: int) -> Dict[str, int]:
        """Live bytes by category after op `k` (one pass over the spans)."""
        out = dict.fromkeys(CATEGORIES, 0)
        for span in self._live_at(k):
            out[span.storage.resolved()] += span.nbytes
        return out

    def largest_at(self, k: int, n: int = 12) -> List[Dict[str, object]]:
        """The `n` largest storages live after op `k`, outside parameters, gradients and optimizer state, with
        the op that made them: what to look at when the peak is larger than the state."""
        spans = [
            s for s in self._live_at(k) if s.storage.resolved() not in ("parameters", "gradients", "optimizer_state")
        ]
        spans.sort(key=lambda s: -s.nbytes)
        return [{"bytes": s.nbytes, "category": s.storage.resolved(), "made_by": s.storage.origin} for s in spans[:n]]

    def report(self) -> MemoryReport:
        """The peak and its breakdown by category (module docstring); call after the `with` block."""
        breakdown = self.breakdown_at(self.peak_clock)
        final = self.breakdown_at(self.clock)
        if sum(breakdown.values()) != self.peak_bytes or sum(final.values()) != self.live_bytes:
            raise AssertionError(f"spans do not add up: {breakdown} vs {self.peak_bytes}")
        return MemoryReport(
            peak_bytes=self.peak_bytes,
            breakdown=breakdown,
            largest=self.largest_at(self.peak_clock),
            final_breakdown=final,
            saved_per_forward=list(self.saved_per_forward),
            phase=self._phase_name(),
            microbatch=self.peak_index,
            final_bytes=self.live_bytes,
            ops=self.clock,
            storages=len(self._spans),
        )
