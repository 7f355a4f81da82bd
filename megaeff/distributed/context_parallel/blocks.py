"""Block attention for context parallelism: the local kernel, the causal block plan, the log-sum-exp merge.

A rank computes attention of its local queries against one key/value block at a time (its own, or one that
arrived from a peer) and merges the partial results. Three pieces are shared by the ring and LightSeq engines:

- the block kernel (`kernel.forward(q, k, v, causal)` -> (out, lse); `kernel.backward(q, k, v, dout, lse,
  delta, out, causal)` -> (dq, dk, dv)): forward returns the block output *and* its log-sum-exp in at least
  fp32 (float64 stays float64); backward takes the final output's row statistics (lse, and delta =
  rowsum(dO * O) or the final output O itself) so that every block's dQ/dK/dV contribution is exact without
  rescaling (FlashAttention's backward). `causal` is the bottom-right-aligned causal mask (key j visible to
  query i iff j <= i + Tk - Tq), the only mask the plan produces. `MathBlockKernel` here materializes each
  block's scores; the fused kernels of flash_blocks.py never do. A kernel whose `needs_out` is true computes
  delta from O itself (the engines then pass O and LightSeq helpers receive O instead of delta). Grouped-query
  attention is computed grouped: K and V are never expanded, neither on the wire nor in memory.
- `plan_blocks`: which (query chunk, key chunk) pairs of a step are visible. Chunks carry global positions
  (context_parallel/sharding.py): a key chunk after the query chunk is skipped, one before it is fully
  visible, the same chunk is causal. The key chunks a query chunk sees are a prefix of the local keys whose
  last chunk is the query chunk itself, so the mask of such a block is exactly the bottom-right-aligned causal
  mask and is never materialized by the plan. Skipped pairs are never computed, so no row is ever fully
  masked (no NaN). The same plan serves contiguous and zigzag shards.
- `merge_`: out and lse of the rows so far combined with a new block's, in the accumulation dtype:
  lse' = logaddexp(lse, lse_b), out' = exp(lse - lse')·out + exp(lse_b - lse')·o_b (lse = -inf before the first).

`AttentionCounter` counts what was computed, so tests can check the LightSeq balance and that a rematerialized
backward never reruns the attention forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@dataclass
class AttentionCounter:
    """Attention work of one rank. A block is one (query chunk, key chunk) pair of the causal grid; `*_work`
    counts the causally visible score entries of the computed blocks, summed over batch and heads (a diagonal
    block of c tokens counts c(c+1)/2 per row of heads), so it compares ranks and schemes of unequal chunk
    sizes. `forward_calls` counts attention forwards that computed blocks, `replays` those that returned a
    rematerialized output without computing (the checkpoint path)."""

    forward_calls: int = 0
    replays: int = 0
    forward_blocks: int = 0
    forward_work: int = 0
    backward_blocks: int = 0
    backward_work: int = 0

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


class Block(NamedTuple):
    """Local query rows [q_lo, q_hi) against the first kv_len local rows of a key block."""

    q_lo: int
    q_hi: int
    kv_len: int
    causal: bool  # bottom-right-aligned causal mask (key j visible to row i iff j <= i + kv_len - rows); else all
    pairs: int
    work: int  # visible score entries per (batch, head)


def plan_blocks(q_chunks: Sequence[int], kv_chunks: Sequence[int], chunk_len: int) -> List[Block]:
    """The computations of one (local queries, key block) step under a causal mask, query chunks that see the
    same unmasked key prefix merged into one block (fewer, larger matmuls)."""
    c = chunk_len
    out: List[Block] = []
    for i, qc in enumerate(q_chunks):
        n = sum(1 for kc in kv_chunks if kc <= qc)
        if n == 0:
            continue
        if any(kc > qc for kc in kv_chunks[:n]):
            raise ValueError(f"key chunks {tuple(kv_chunks)} are not ascending")
        diag = kv_chunks[n - 1] == qc  # then chunks [:n-1] precede qc: bottom-right causal over n*c keys
        work = (n - 1) * c * c + c * (c + 1) // 2 if diag else n * c * c
        if diag:
            out.append(Block(i * c, (i + 1) * c, n * c, True, n, work))
        elif out and not out[-1].causal and out[-1].kv_len == n * c and out[-1].q_hi == i * c:
            prev = out[-1]
            out[-1] = Block(prev.q_lo, (i + 1) * c, prev.kv_len, False, prev.pairs + n, prev.work + work)
        else:
            out.append(Block(i * c, (i + 1) * c, n * c, False, n, work))
    return out


def causal_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """The bottom-right-aligned causal mask [Tq, Tk] (True = visible) of a block whose keys end at its queries."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)


class MathBlockKernel:
    """Exact attention of a query block against a key block, in at least fp32; see the module docstring."""

    name = "math"
    needs_out = False

    @staticmethod
    def _scores(q, k, causal):
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        if H % Hkv:
            raise ValueError(f"query heads ({H}) must be a multiple of the key/value heads ({Hkv})")
        g = H // Hkv
        acc = acc_dtype(q.dtype)
        qg = q.to(acc).reshape(B, Hkv, g * Tq, D)  # query head h = kv_head * g + j, as repeat_interleave pairs them
        s = torch.matmul(qg, k.to(acc).transpose(-1, -2)).mul_(D**-0.5)
        if causal:
            mask = causal_mask(Tq, Tk, q.device)
            s = s.view(B, Hkv, g, Tq, Tk).masked_fill_(~mask, float("-inf")).view(B, Hkv, g * Tq, Tk)
        return qg, s

    def forward(self, q, k, v, causal: bool = False):
        """(out [B, H, Tq, D], lse [B, H, Tq]) in the accumulation dtype."""
        B, H, Tq, D = q.shape
        _, s = self._scores(q, k, causal)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s.sub_(lse.unsqueeze(-1)))
        o = torch.matmul(p, v.to(p.dtype))
        return o.view(B, H, Tq, D), lse.view(B, H, Tq)

    def backward(self, q, k, v, dout, lse, delta, out=None, causal: bool = False):
        """(dq, dk, dv) of this block in the accumulation dtype, from the *final* rows' lse and delta (computed
        from the final output `out` when delta is None)."""
        B, H, Tq, D = q.shape
        Hkv = k.shape[1]
        g = H // Hkv
        if delta is None:
            delta = row_delta(out, dout)
        qg, s = self._scores(q, k, causal)
        acc = s.dtype
        p = torch.exp(s.sub_(lse.to(acc).reshape(B, Hkv, g * Tq, 1)))
        dog = dout.to(acc).reshape(B, Hkv, g * Tq, D)
        dv = torch.matmul(p.transpose(-1, -2), dog)
        ds = torch.matmul(dog, v.to(acc).transpose(-1, -2))
        ds.sub_(delta.to(acc).reshape(B, Hkv, g * Tq, 1)).mul_(p)
        del p
        scale = D**-0.5
        dq = torch.matmul(ds, k.to(acc)).mul_(scale)
        dk = torch.matmul(ds.transpose(-1, -2), qg).mul_(scale)
        return dq.view(B, H, Tq, D), dk, dv


def merge_(acc_out: torch.Tensor, acc_lse: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, rows: slice) -> None:
    """Fold a block result (o, lse) for local rows `rows` into the running (acc_out, acc_lse), in place."""
    old = acc_lse[:, :, rows]
    new = torch.logaddexp(old, lse)
    acc_out[:, :, rows] = (
        torch.exp(old - new).unsqueeze(-1) * acc_out[:, :, rows] + torch.exp(lse - new).unsqueeze(-1) * o
    )
    acc_lse[:, :, rows] = new


def row_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) [B, H, T] in the accumulation dtype: the softmax backward's per-row constant."""
    acc = acc_dtype(out.dtype)
    return (dout.to(acc) * out.to(acc)).sum(-1)


class SequenceEngine:
    """Shared by the engines whose saved state is (q, k, v, out, lse) in the local sequence layout (ring and
    LightSeq): the inputs need no preparation, so a rematerialized backward only needs the cached (out, lse)."""

    def __init__(self, cg, sharding: str, kernel, counter: Optional[AttentionCounter]):
        self.cg, self.sharding, self.kernel = cg, sharding, kernel
        self.counter = counter if counter is not None else AttentionCounter()

    def count_forward(self, blk: Block, batch_heads: int) -> None:
        self.counter.forward_blocks += blk.pairs
        self.counter.forward_work += blk.work * batch_heads

    def count_backward(self, blk: Block, batch_heads: int) -> None:
        self.counter.backward_blocks += blk.pairs
        self.counter.backward_work += blk.work * batch_heads

    def attend_(self, acc_out, acc_lse, q, k, v, q_chunks, kv_chunks, chunk_len) -> None:
        """Merge q's attention to one key block into the accumulators (every visible block of the step)."""
        for blk in plan_blocks(q_chunks, kv_chunks, chunk_len):
            rows = slice(blk.q_lo, blk.q_hi)
            o, lse = self.kernel.forward(q[:, :, rows], k[:, :, : blk.kv_len], v[:, :, : blk.kv_len], blk.causal)
            merge_(acc_out, acc_lse, o, lse, rows)
            del o, lse
            self.count_forward(blk, q.shape[0] * q.shape[1])

    def attend_backward(self, q, k, v, dout, lse, delta, out, q_chunks, kv_chunks, chunk_len):
        """(dq, dk, dv) of q against one key block, in the accumulation dtype; None where nothing is visible.
        `delta` (rowsum(dO * O)) or `out` (the final O) may be None, whichever the kernel does not need."""
        blocks = plan_blocks(q_chunks, kv_chunks, chunk_len)
        dq = dk = dv = None
        for blk in blocks:
            rows, kv = slice(blk.q_lo, blk.q_hi), slice(0, blk.kv_len)
            gq, gk, gv = self.kernel.backward(
                q[:, :, rows],
                k[:, :, kv],
                v[:, :, kv],
                dout[:, :, rows],
                lse[:, :, rows],
                None if delta is None else delta[:, :, rows],
                None if out is None else out[:, :, rows],
                blk.causal,
            )
            self.count_backward(blk, q.shape[0] * q.shape[1])
            if len(blocks) == 1 and blk.q_hi - blk.q_lo == q.shape[2] and blk.kv_len == k.shape[2]:
                return gq, gk, gv  # one block covering everything: no zero-filled copies
            if dq is None:
                acc = gq.dtype
                dq = torch.zeros(q.shape, dtype=acc, device=q.device)
                dk = torch.zeros(k.shape, dtype=acc, device=k.device)
                dv = torch.zeros(v.shape, dtype=acc, device=v.device)
            dq[:, :, rows] += gq
            dk[:, :, kv] += gk
            dv[:, :, kv] += gv
            del gq, gk, gv
        return dq, dk, dv

    def row_stats(self, out, dout):
        """(delta, out) for the block backward: delta = rowsum(dO * O) for kernels that take it, else O."""
        if getattr(self.kernel, "needs_out", False):
            return None, out
        return row_delta(out, dout), None

    @staticmethod
    def new_accumulators(q):
        acc = acc_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        return out, lse

    @staticmethod
    def finish(result, dtype, out=None):
        """The output in the input dtype: `result` itself when it already is, else a converted copy; written into
        `out` (a head group's view of the full output, heads.py) when one is given."""
        if out is None:
            return result.to(dtype)
        out.copy_(result)
        return out

    # ---- the interface `ContextParallelAttention` drives (attention.py; heads.py wraps it)
    def inputs(self, q, k, v):
        return (q, k, v)

    def cache_tail(self, saved):
        return saved[3:]
