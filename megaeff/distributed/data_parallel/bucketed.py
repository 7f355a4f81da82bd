"""Data-parallel gradient reduction over `dp_cp`: bucketed, summed, overlapped with the last backward.

Megatron / torch-DDP style. Trainable parameters are packed, in *reverse* registration order (the order backward
produces their gradients), into buckets of about `bucket_mb` MiB, one bucket per dtype and device, each bucket
one flat contiguous buffer. Every parameter's `.grad` is a view into its bucket: `prepare` attaches the views
before backward (zeroing those whose grad is None, e.g. after `zero_grad(set_to_none=True)`), so autograd
accumulates in place and no copy is made. A grad replaced behind the reducer's back is copied into its view (in
the hook or in `finish`) and the view reattached.

One step with k micro-batches:

    optimizer.zero_grad(set_to_none=True)
    for i, mb in enumerate(micro_batches):
        reducer.prepare(final=i == k - 1)   # before this micro-batch's backward
        (loss(mb) / global_tokens).backward()
    reducer.finish()                        # every bucket summed over dp_cp; grads equal on all ranks
    optimizer.step()

Gradients are summed, never averaged: the loss is already divided by the global token count.

Collective order. With `overlap=True`, a post-accumulate-grad hook counts each parameter of the final
micro-batch once; a bucket whose parameters are all ready launches an async all-reduce, but buckets launch
strictly in bucket order (bucket i waits for buckets < i), so every rank issues the same collectives in the same
order whatever order its backward produced gradients in. `finish` launches what is left, in order (parameters
that got no gradient count as zeros: their view is already zero or holds earlier micro-batches), then waits.
With `overlap=False`, or when `prepare(final=True)` was never called, `finish` reduces every bucket.
The final micro-batch must run exactly one backward: a gradient accumulated into a bucket already in flight
raises an error instead of being silently lost.

Optimizer in backward (`set_final_hook`, megaeff/train/in_backward.py): each bucket's parameters are reported
in `finish()`, bucket by bucket as its all-reduce completes. Their gradients are views into the static buckets,
so freeing them saves no gradient memory in this layout (use FSSDP for that). In a group of one (no buckets), a
post-accumulate-grad hook reports each parameter as the final micro-batch's backward accumulates it: tensor
and sequence parallel partial sums are all-reduced inside autograd before that, so the gradient is complete.

Gradient-accumulation fusion (megaeff/layers/grad_accum_fusion.py): a fused weight's gradient is its fp32
`main_grad`, never `.grad`; it is bucketed by that dtype, `main_grad` is the bucket view, and the Function's
`add_main_grad_hook` stands in for the post-accumulate-grad hook (autograd never accumulates such a weight).

A parameter unused on every rank ends the step with a zero gradient, not None (as torch DDP with
`gradient_as_bucket_view`). Every all-reduce is recorded in `dims.comm_stats` as `dp_cp/all_reduce` with the
bucket's bytes. A group of one is a no-op: no buckets, no hooks, `finish` returns at once.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from megaeff.layers.grad_accum_fusion import add_main_grad_hook, grad_of, is_fused, set_grad

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims

MiB = 1024 * 1024


class _Bucket:
    __slots__ = ("index", "buffer", "params", "names", "views", "pending", "launched")

    def __init__(self, index: int, params: List[torch.nn.Parameter], names: List[str]):
        self.index, self.params, self.names = index, params, names
        p0 = params[0]
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=_grad_dtype(p0), device=p0.device)
        self.views: List[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.buffer[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        self.pending = len(params)  # parameters of the final micro-batch not yet ready
        self.launched = False

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def _grad_dtype(p: torch.nn.Parameter) -> torch.dtype:
    return torch.float32 if is_fused(p) else p.dtype


def _on_grad(p: torch.nn.Parameter, hook):
    """`hook(p)` each time p's gradient has been accumulated (a fused weight's main_grad, else autograd's .grad)."""
    return add_main_grad_hook(p, hook) if is_fused(p) else p.register_post_accumulate_grad_hook(hook)


def _adopt(p: torch.nn.Parameter, view: torch.Tensor) -> None:
    """Make p's gradient (`grad_of`: `.grad`, or a fused weight's main_grad) the bucket view, keeping its value
    (None counts as zero)."""
    g = grad_of(p)
    if g is None:
        view.zero_()
    elif g.data_ptr() == view.data_ptr() and g.shape == view.shape:
        return
    else:
        view.copy_(g)
    set_grad(p, view)


class GradReducer:
    """Bucketed SUM all-reduce of the gradients over `dims`' dp_cp group (see the module docstring).

    Counters: `num_buckets`, `bucket_names` (per bucket, in launch order), `bucket_bytes`, `total_bytes` (what
    one step records), and `launched_in_backward`: buckets of the last finished step launched from hooks
    during backward, i.e. overlapped with compute (0 with `overlap=False`).
    """

    def __init__(
        self,
        params: Sequence[Tuple[str, torch.nn.Parameter]],
        dims: ParallelDims,
        *,
        bucket_mb: float = 25.0,
        overlap: bool = True,
        group_name: str = "dp_cp",
    ):
        if bucket_mb < 0:
            raise ValueError(f"bucket_mb must be >= 0, got {bucket_mb}")
        self.cg = dims.comm(group_name)
        self.overlap = overlap
        self.enabled = self.cg.size > 1 and self.cg.group is not None
        self.buckets: List[_Bucket] = []
        self._slot: Dict[int, Tuple[_Bucket, int]] = {}  # id(param) -> (bucket, position)
        self._hooks: list = []
        self._handles: list = []
        self._lock = threading.Lock()
        self._final = False
        self._next = 0  # first bucket not launched yet in the final phase
        self._ready: set = set()
        self._from_hooks = 0
        self.launched_in_backward = 0
        self._final_hook = None
        self._in_final = False  # inside the step's final backward (whatever `overlap`): the optimizer-in-backward hook
        unique: List[Tuple[str, torch.nn.Parameter]] = []
        seen = set()
        for name, p in params:
            if p.requires_grad and id(p) not in seen:  # tied weights: one slot, one hook
                seen.add(id(p))
                unique.append((name, p))
        self._params = [p for _, p in unique]
        if not self.enabled:
            return

        cap = bucket_mb * MiB
        open_: Dict[tuple, Tuple[List[torch.nn.Parameter], List[str], int]] = {}
        closed: List[Tuple[List[torch.nn.Parameter], List[str]]] = []
        for name, p in reversed(unique):
            dtype = _grad_dtype(p)
            key = (dtype, p.device)
            ps, ns, size = open_.pop(key, ([], [], 0))
            ps.append(p)
            ns.append(name)
            size += p.numel() * dtype.itemsize
            if size >= cap:
                closed.append((ps, ns))
            else:
                open_[key] = (ps, ns, size)
        closed.extend((ps, ns) for ps, ns, _ in open_.values())
        # Launch order: by the position of each bucket's first parameter in the reversed order (the same on
        # every rank, as the parameter list is).
        position = {id(p): i for i, (_, p) in enumerate(reversed(unique))}
        closed.sort(key=lambda b: position[id(b[0][0])])
        for i, (ps, ns) in enumerate(closed):
            bucket = _Bucket(i, ps, ns)
            self.buckets.append(bucket)
            for j, p in enumerate(ps):
                self._slot[id(p)] = (bucket, j)
        if overlap:
            for _, p in unique:
                self._hooks.append(_on_grad(p, self._hook))

    # ------------------------------------------------------------------ counters
    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    @property
    def bucket_names(self) -> List[List[str]]:
        return [list(b.names) for b in self.buckets]

    @property
    def bucket_bytes(self) -> List[int]:
        return [b.nbytes for b in self.buckets]

    @property
    def total_bytes(self) -> int:
        return sum(self.bucket_bytes)

    def describe(self) -> str:
        if not self.enabled:
            return f"grad reducer: {self.cg.name} group of one, no-op"
        return (
            f"grad reducer: {self.num_buckets} buckets, {self.total_bytes / MiB:.1f} MiB summed over "
            f"{self.cg.name} ({self.cg.size} ranks), {'overlapped with backward' if self.overlap else 'after backward'}"
        )

    # ------------------------------------------------------------------ step
    def set_final_hook(self, hook) -> None:
        """`GradSync.set_final_hook` (module docstring): buckets report in `finish()`; a group of one registers
        post-accumulate-grad hooks (once) that report during the final backward."""
        self._final_hook = hook
        if hook is not None and not self.enabled and not self._hooks:
            self._hooks = [_on_grad(p, self._final_grad) for p in self._params]

    def _final_grad(self, p: torch.nn.Parameter) -> None:
        if self._in_final and self._final_hook is not None:
            self._final_hook([p])

    def prepare(self, final: bool) -> None:
        """Call before each micro-batch's backward; `final=True` for the last one of the step, whose backward
        launches the reduction (with overlap). Attaches the bucket views as `.grad`."""
        self._in_final = bool(final)
        if not self.enabled:
            return
        if self._handles or self._next:
            raise RuntimeError("GradReducer.prepare() called while a reduction is in flight; call finish() first")
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.views):
                _adopt(p, view)
            bucket.pending, bucket.launched = len(bucket.params), False
        self._ready.clear()
        self._from_hooks = 0
        self._final = final and self.overlap

    def _hook(self, p: torch.nn.Parameter) -> None:
        bucket, j = self._slot[id(p)]
        with self._lock:
            if bucket.launched:
                raise RuntimeError(
                    f"gradient of {bucket.names[j]} accumulated after its bucket was reduced: the final "
                    "micro-batch must run exactly one backward (call prepare(final=False) for earlier ones)"
                )
            _adopt(p, bucket.views[j])
            if not self._final or id(p) in self._ready:
                return
            self._ready.add(id(p))
            bucket.pending -= 1
            while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
                self._launch(self.buckets[self._next])
                self._from_hooks += 1

    def _launch(self, bucket: _Bucket) -> None:
        for p, view in zip(bucket.params, bucket.views):
            _adopt(p, view)
        bucket.launched = True
        self._next = bucket.index + 1
        self.cg.record("all_reduce", bucket.nbytes)
        self._handles.append(dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, group=self.cg.group, async_op=True))

    def finish(self) -> None:
        """Launch the buckets not launched during backward (in order), wait for all; grads are then summed."""
        self._in_final = False
        if not self.enabled:
            return
        with self._lock:
            for bucket in self.buckets[self._next :]:
                self._launch(bucket)
            handles, self._handles = self._handles, []
        for bucket, h in zip(self.buckets, handles):  # one handle per bucket, in bucket order
            h.wait()
            if self._final_hook is not None:
                self._final_hook(list(bucket.params))
        self.launched_in_backward = self._from_hooks
        self._next, self._final, self._from_hooks = 0, False, 0
        self._ready.clear()
        for bucket in self.buckets:
            bucket.launched, bucket.pending = False, len(bucket.params)

    def remove(self) -> None:
        """Remove the hooks (the grads stay views into the buckets until replaced)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
