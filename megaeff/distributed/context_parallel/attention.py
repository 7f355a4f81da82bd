"""Context parallelism: attention over a sequence sharded across the cp group (GitHub issue 8).

    attn = ContextParallelAttention(dims.comm("cp"), impl="ring", sharding="zigzag")
    x_local   = attn.shard(x)                  # [B, T, ...] -> [B, T/cp, ...] (inputs, labels, loss mask alike)
    positions = attn.positions(T, batch=B)     # [B, T/cp] global positions -> apply_rope(q, cos, sin, positions)
    out = attn(q, k, v, causal=True)           # local q [B, Hq, T/cp, D], k/v [B, Hkv, T/cp, D] -> [B, Hq, T/cp, D]

`attn` is called exactly like the attention backends of megaeff/layers/attention.py, so the model's
`attention_backend` can be replaced by it. Implementations (`impl`):
- `ring` (ring.py): K/V blocks circulate over the ring with batched isend/irecv overlapped with compute,
  partial outputs merged by log-sum-exp, dK/dV circulating back to their owners; `zigzag` sharding (default)
  balances the causal work, `contiguous` is the plain ring.
- `lightseq` (lightseq.py): LightSeq DistAttn's balanced schedule on contiguous shards (even cp), where ranks
  that finish early compute blocks of later ranks; plus rematerialization-aware checkpointing (below).
- `ulysses` (ulysses.py): all-to-all to head shards, full local attention, all-to-all back; query and
  key/value heads divisible by cp.
All three are exact (float64 tests match single-process attention to 1e-10), support grouped-query attention
without expanding K/V, and count every transfer in `dims.comm_stats` under "cp/p2p_send" or "cp/all_to_all".
The blocks are computed by the block kernel `backend` names (`model.attention_backend`): `auto` (default),
`sdpa` and `flash` select the fused kernels of flash_blocks.py, which never materialize a block's scores
(torch's flash attention on CPU; flash-attn or torch's memory-efficient kernel on CUDA) and match the math
kernel to fp32 round-off; `math` selects the exact math kernel of blocks.py (each block's fp32 scores
materialized). Any object with the block-kernel `forward` / `backward` methods (blocks.py) can be passed too.
Every scheme runs head group by head group where its K/V are large (heads.py): its buffers then span a few
heads instead of all of them, which is what makes the longest trainable sequence grow with cp.

Rematerialization-aware checkpointing (LightSeq): standard activation checkpointing reruns the whole layer in
backward, attention forward included. With

    y = attn.checkpoint(layer_fn, x, ...)    # torch.utils.checkpoint(..., use_reentrant=False,
                                             #                         context_fn=attn.checkpoint_context)

the first run keeps the attention output and its log-sum-exp (one output per layer, as LightSeq's boundary at
the attention output does), and the recomputation rebuilds only what attention consumes (q, k, v) and reuses
them: the backward never runs the attention forward again (`AttentionCounter.replays` counts the reuses). Works
for every impl (Ulysses repeats its q/k/v all-to-all, not the attention).

Bytes per attention call per rank (recorded payloads; formulas in each module, closed forms in `comm_bytes`),
with N = B T tokens, h_kv = Hkv D, e element size, a = max(e, 4) the accumulation element size:
    ring      fwd 2 (P-1)/P N h_kv e               bwd 2 (P-1)/P N h_kv e + 2 N h_kv a
    lightseq  per rank, see lightseq.py (keys sent directly to the ranks that need them, plus helper traffic;
              helpers receive O instead of delta when the kernel takes O: `sends_out`)
    ulysses   fwd 2 N (Hq + Hkv) D e / P           bwd the same (payload; (P-1)/P of it leaves the rank)

What the model and trainer must do: shard inputs, labels (shifted before sharding) and loss masks with
`shard`; pass `positions` to RoPE; normalize the loss by the global token count and reduce gradients over the
dp_cp group (cp ranks hold the same weights and see different tokens).
"""

from __future__ import annotations

import collections
import contextlib
from typing import Optional, Tuple, Union

import torch

from megaeff.distributed.context_parallel.blocks import AttentionCounter
from megaeff.distributed.context_parallel.flash_blocks import select_block_kernel
from megaeff.distributed.context_parallel.heads import HeadGroupEngine
from megaeff.distributed.context_parallel.lightseq import (
    LightSeqEngine,
    check_lightseq,
    lightseq_block_counts,
    lightseq_bytes,
)
from megaeff.distributed.context_parallel.ring import RingEngine, ring_bytes
from megaeff.distributed.context_parallel.sharding import (
    SHARDINGS,
    ContextParallelError,
    check_seq_len,
    check_sharding,
    gather_sequence,
    sequence_positions,
    shard_sequence,
    unshard_sequence,
)
from megaeff.distributed.context_parallel.ulysses import UlyssesEngine, check_heads, ulysses_bytes

IMPLS = ("ring", "lightseq", "ulysses")
DEFAULT_SHARDING = {"ring": "zigzag", "lightseq": "contiguous", "ulysses": "contiguous"}
_ENGINES = {"ring": RingEngine, "lightseq": LightSeqEngine, "ulysses": UlyssesEngine}

__all__ = [
    "IMPLS",
    "SHARDINGS",
    "ContextParallelAttention",
    "ContextParallelError",
    "AttentionCounter",
    "comm_bytes",
    "shard_sequence",
    "sequence_positions",
    "gather_sequence",
    "unshard_sequence",
    "lightseq_block_counts",
]


def _block_kernel(backend):
    if backend is None or isinstance(backend, str):
        return select_block_kernel("auto" if backend is None else backend)
    if not (callable(getattr(backend, "forward", None)) and callable(getattr(backend, "backward", None))):
        raise TypeError("a context-parallel backend needs forward(q, k, v, causal) and backward(...) (see blocks.py)")
    return backend


class _CPAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn, want_lse):
        engine = attn.engine
        mode, cache = attn._modes[-1] if attn._modes else (None, None)
        if mode == "replay":
            if not cache:
                raise RuntimeError("checkpoint recomputation called the attention more often than the forward did")
            out, lse, tail = cache.popleft()
            saved = (*engine.inputs(q, k, v), *tail)
            engine.counter.replays += 1
        else:
            out, saved, lse = engine.forward(q, k, v, want_lse)
            engine.counter.forward_calls += 1
            if mode == "record":  # kept for the recomputation; everything else of the segment is dropped
                cache.append(
                    (
                        out.detach(),
                        None if lse is None else lse.detach(),
                        tuple(None if t is None else t.detach() for t in engine.cache_tail(saved)),
                    )
                )
        ctx.engine = engine
        ctx.save_for_backward(*saved)
        if want_lse:
            ctx.mark_non_differentiable(lse)
            return out, lse
        return out

    @staticmethod
    def backward(ctx, dout, *unused):
        dq, dk, dv = ctx.engine.backward(ctx.saved_tensors, dout)
        return dq, dk, dv, None, None


class ContextParallelAttention:
    """Attention on this rank's sequence shard of a cp-sharded sequence (module docstring).

    cg: the cp CommGroup (`dims.comm("cp")`); impl: ring | lightseq | ulysses; sharding: zigzag | contiguous
    (default: zigzag for ring, contiguous otherwise; lightseq requires contiguous); backend: the block kernel
    (`model.attention_backend`: "auto"/"sdpa"/"flash" -> fused, "math" -> exact math, or an object); counter:
    an `AttentionCounter` to count into; head_groups: run the scheme on this many head groups one after the
    other ("auto": by size, heads.py) so that its buffers span fewer heads.
    """

    def __init__(
        self,
        cg,
        impl: str = "ring",
        sharding: Optional[str] = None,
        backend="auto",
        counter: Optional[AttentionCounter] = None,
        head_groups: Union[int, str] = "auto",
    ):
        if impl not in IMPLS:
            raise ContextParallelError(
                "parallel.cp_impl", f"unknown context-parallel impl {impl!r}; available: {', '.join(IMPLS)}"
            )
        sharding = sharding or DEFAULT_SHARDING[impl]
        check_sharding(sharding)
        if impl == "lightseq":
            check_lightseq(cg.size, sharding)
        self.cg, self.impl, self.sharding = cg, impl, sharding
        self.counter = counter if counter is not None else AttentionCounter()
        self.kernel = _block_kernel(backend)
        self.engine = HeadGroupEngine(_ENGINES[impl](cg, sharding, self.kernel, self.counter), head_groups)
        self._modes = []

    @property
    def sends_out(self) -> bool:
        """The block kernel's backward takes the final output O instead of delta (LightSeq's bytes differ)."""
        return bool(getattr(self.kernel, "needs_out", False))

    @property
    def name(self) -> str:
        return f"{self.impl}/{self.sharding} over cp={self.cg.size}"

    def __repr__(self) -> str:
        return (
            f"ContextParallelAttention({self.name}, kernel={getattr(self.kernel, 'name', type(self.kernel).__name__)})"
        )

    # ------------------------------------------------------------------ sharding of the token tensors
    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return shard_sequence(x, self.cg.size, self.cg.rank, self.sharding, dim)

    def positions(self, seq_len: int, batch: Optional[int] = None, device=None) -> torch.Tensor:
        return sequence_positions(seq_len, self.cg.size, self.cg.rank, self.sharding, batch, device)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return gather_sequence(x, self.cg, self.sharding, dim)

    # ------------------------------------------------------------------ attention
    def _check(self, q, k, v, causal, segment_ids) -> None:
        if segment_ids is not None:
            raise ContextParallelError(
                "data.reset_attention_mask",
                f"per-document attention masks are not supported under context parallelism ({self.name})",
            )
        if not causal:
            raise ValueError("context-parallel attention supports causal attention only (the causal block plan)")
        if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
            raise ValueError(
                f"expected q [B, Hq, T, D] and k, v [B, Hkv, T, D] of one sequence shard, got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of the key/value heads ({k.shape[1]})")
        check_seq_len(q.shape[2] * self.cg.size, self.cg.size, self.sharding)
        if self.impl == "ulysses":
            check_heads(q.shape[1], k.shape[1], self.cg.size)

    def __call__(self, q, k, v, causal: bool = True, segment_ids=None) -> torch.Tensor:
        self._check(q, k, v, causal, segment_ids)
        return _CPAttentionFn.apply(q, k, v, self, False)

    def forward_with_lse(self, q, k, v, causal: bool = True, segment_ids=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(out, lse [B, Hq, T/cp] of this rank's queries, in the accumulation dtype), like MathAttention's."""
        self._check(q, k, v, causal, segment_ids)
        return _CPAttentionFn.apply(q, k, v, self, True)

    # ------------------------------------------------------------------ rematerialization-aware checkpointing
    @contextlib.contextmanager
    def _mode(self, mode: str, cache):
        self._modes.append((mode, cache))
        try:
            yield
        finally:
            self._modes.pop()

    def checkpoint_context(self):
        """`context_fn` for torch.utils.checkpoint (use_reentrant=False): the first run caches (out, lse) of
        every attention call of the segment, the recomputation replays them instead of recomputing."""
        cache = collections.deque()
        return self._mode("record", cache), self._mode("replay", cache)

    def checkpoint(self, fn, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False, context_fn=self.checkpoint_context, **kwargs)


def comm_bytes(
    impl: str,
    *,
    B: int,
    T: int,
    cp: int,
    Hq: int,
    Hkv: int,
    D: int,
    elem: int,
    acc_elem: Optional[int] = None,
    rank: int = 0,
    sends_out: bool = False,
) -> Tuple[int, int]:
    """(forward, backward) bytes rank `rank` records for one attention call: "cp/p2p_send" for ring and
    lightseq (all of it leaves the rank), "cp/all_to_all" payload for ulysses ((cp-1)/cp of it leaves).
    `sends_out`: the block kernel takes O instead of delta (`ContextParallelAttention.sends_out`)."""
    if acc_elem is None:
        acc_elem = max(elem, 4)
    if impl == "ring":
        return ring_bytes(B, T, cp, Hkv, D, elem, acc_elem)
    if impl == "lightseq":
        return lightseq_bytes(B, T, cp, Hq, Hkv, D, elem, acc_elem, rank, sends_out)
    if impl == "ulysses":
        return ulysses_bytes(B, T, cp, Hq, Hkv, D, elem)
    raise ValueError(f"unknown impl {impl!r}")
