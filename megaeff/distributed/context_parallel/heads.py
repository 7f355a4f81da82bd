"""Head groups: a context-parallel engine run on a few heads at a time, so that its working buffers shrink.

Every buffer a scheme adds on top of the layer's own tensors (K/V blocks in flight and their double buffers,
dK/dV partial sums, LightSeq's query bundles and returned partials, Ulysses' head-layout copies and all-to-all
buffers, the per-block gradients) spans all heads of this rank's tokens. Attention is independent per head, so
the engines can run group after group of heads (grouped-query attention: whole kv heads with their query heads)
and write each group's output and gradients into the full tensors: the working set then spans 1/n of the heads.
The bytes sent are the same (n transfers of 1/n each); what changes is the message size, and each group's
transfers still overlap that group's compute.

`auto` (the default) picks, for cp > 1, the largest n for which one group's local K and V still make at least
`GROUP_BYTES` (messages that large run at link bandwidth rather than latency); with it, small shapes run in one
group. Ulysses needs every group's query and kv heads divisible by cp. `AttentionCounter` blocks are counted
once per call (they are (query chunk, key chunk) pairs, the same for every group); work sums over all heads.
"""

from __future__ import annotations

import contextlib
from typing import List, Tuple, Union

import torch

from megaeff.distributed.context_parallel.blocks import AttentionCounter

GROUP_BYTES = 32 * 2**20
SAVED, INPUTS = 5, 3  # every engine saves (3 inputs, 2 more): the layout below relies on it


def group_counts(Hq: int, Hkv: int, cp: int, impl: str) -> List[int]:
    """The head-group counts an engine can run: divisors of Hkv (Ulysses: each group's heads divisible by cp)."""
    ok = []
    for n in range(1, Hkv + 1):
        if Hkv % n:
            continue
        if impl == "ulysses" and ((Hq // n) % cp or (Hkv // n) % cp):
            continue
        ok.append(n)
    return ok


class HeadGroupEngine:
    """Wraps an engine (ring, LightSeq, Ulysses) with the interface `ContextParallelAttention` drives, running
    it head group by head group (module docstring). `groups`: "auto" or a count."""

    def __init__(self, engine, groups: Union[int, str] = "auto", group_bytes: int = GROUP_BYTES):
        if groups != "auto" and (not isinstance(groups, int) or groups < 1):
            raise ValueError(f"head_groups must be 'auto' or a positive int, got {groups!r}")
        self.engine, self.groups, self.group_bytes = engine, groups, group_bytes

    @property
    def counter(self) -> AttentionCounter:
        return self.engine.counter

    def count(self, q, k) -> int:
        Hq, Hkv, P = q.shape[1], k.shape[1], self.engine.cg.size
        ok = group_counts(Hq, Hkv, P, self.engine.impl)
        if self.groups != "auto":
            if self.groups not in ok:
                raise ValueError(
                    f"{self.groups} head groups do not split Hq={Hq}, Hkv={Hkv} for {self.engine.impl} over "
                    f"cp={P}; possible: {ok}"
                )
            return self.groups
        if P == 1:
            return 1  # no communication buffers to shrink
        kv_bytes = 2 * k.numel() * k.element_size()
        return max([n for n in ok if kv_bytes // n >= self.group_bytes], default=1)

    @staticmethod
    def _slices(n: int, Hq: int, Hkv: int) -> List[Tuple[slice, slice]]:
        a, b = Hq // n, Hkv // n
        return [(slice(g * a, (g + 1) * a), slice(g * b, (g + 1) * b)) for g in range(n)]

    @contextlib.contextmanager
    def _counting(self, g: int):
        """Group 0 counts blocks and work; later groups add only their work."""
        if g == 0:
            yield
            return
        main, scratch = self.engine.counter, AttentionCounter()
        self.engine.counter = scratch
        try:
            yield
        finally:
            self.engine.counter = main
            main.forward_work += scratch.forward_work
            main.backward_work += scratch.backward_work

    def forward(self, q, k, v, want_lse: bool = False):
        n = self.count(q, k)
        if n == 1:
            return self.engine.forward(q, k, v, want_lse)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse, inputs, tails = None, [], []
        for g, (hq, hk) in enumerate(self._slices(n, q.shape[1], k.shape[1])):
            with self._counting(g):
                _, saved, lse_g = self.engine.forward(q[:, hq], k[:, hk], v[:, hk], want_lse, out=out[:, hq])
            inputs += saved[:INPUTS]
            # Views of `out` are not saved (autograd forbids saving views of an output made without grad): they
            # are None here and sliced again from the saved `out` in backward.
            tails += [None if t is not None and t._base is out else t for t in saved[INPUTS:]]
            if want_lse:
                if lse is None:
                    lse = torch.empty(q.shape[:3], dtype=lse_g.dtype, device=q.device)
                lse[:, hq] = lse_g
        # The full output is saved only to re-slice the views dropped above (ring, LightSeq). Ulysses saves its
        # own head-layout output, so saving `out` as well would keep a second output-sized tensor to the backward.
        keep = any(t is None for t in tails)
        return out, (*inputs, *tails, out if keep else None), lse

    def backward(self, saved, dout):
        n = len(saved) // SAVED
        if len(saved) == SAVED:  # one group: the engine's own layout
            return self.engine.backward(saved, dout)
        inputs, tails, out = saved[: INPUTS * n], saved[INPUTS * n : -1], saved[-1]
        Hq = dout.shape[1]
        dq = dk = dv = None
        for g in range(n):
            hq = slice(g * Hq // n, (g + 1) * Hq // n)
            with self._counting(g):
                tail = [out[:, hq] if t is None else t for t in tails[2 * g : 2 * g + 2]]
                gq, gk, gv = self.engine.backward((*inputs[INPUTS * g : INPUTS * (g + 1)], *tail), dout[:, hq])
            if dq is None:
                dq = torch.empty(dout.shape, dtype=gq.dtype, device=gq.device)
                kv_shape = (gk.shape[0], gk.shape[1] * n, *gk.shape[2:])
                dk = torch.empty(kv_shape, dtype=gk.dtype, device=gk.device)
                dv = torch.empty(kv_shape, dtype=gv.dtype, device=gv.device)
            hk = slice(g * gk.shape[1], (g + 1) * gk.shape[1])
            dq[:, hq], dk[:, hk], dv[:, hk] = gq, gk, gv
            del gq, gk, gv
        return dq, dk, dv

    # ---- the interface `ContextParallelAttention` drives (rematerialization: inputs, then the cached tail)
    def inputs(self, q, k, v):
        n = self.count(q, k)
        if n == 1:
            return self.engine.inputs(q, k, v)
        return tuple(
            t
            for hq, hk in self._slices(n, q.shape[1], k.shape[1])
            for t in self.engine.inputs(q[:, hq], k[:, hk], v[:, hk])
        )

    def cache_tail(self, saved):
        """What a rematerialized backward cannot rebuild from q, k, v (one group: the engine's; several: every
        group's tail, then the full output)."""
        if len(saved) % SAVED not in (0, 1):
            raise RuntimeError(f"an engine saved {len(saved)} tensors; head groups expect {SAVED} per group")
        return saved[INPUTS * (len(saved) // SAVED) :]
