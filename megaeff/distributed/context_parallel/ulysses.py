"""DeepSpeed-Ulysses over the cp group: all-to-all from sequence shards to head shards, full local attention.

Forward: one all-to-all turns this rank's q, k, v [B, H, T/P, D] (all heads, its tokens) into [B, H/P, T, D]
(its heads, all tokens); q, k and v travel in one call, concatenated along the heads. The tokens arrive rank
after rank, which for zigzag shards is not sequence order, so they are permuted into global order and the
causal attention is the ordinary one. A second all-to-all returns the output to sequence shards. Backward is
the mirror image: dO to head shards, the local attention backward, dQ, dK, dV back in one call. Query and
key/value heads must both be divisible by P (GQA keeps the group structure within each rank's heads).

Bytes per layer per rank ("cp/all_to_all", the input of every all-to-all, of which (P-1)/P leaves the rank),
T_l = T/P, e the element size:
    forward   B T_l D e (Hq + 2 Hkv)   q, k, v      +  B T_l D e Hq   out
    backward  B T_l D e Hq             dO           +  B T_l D e (Hq + 2 Hkv)   dq, dk, dv
`forward_with_lse` adds one all-to-all of the lse (B T_l Hq a, a the accumulation element size).
A rematerialized backward (context_parallel.py) repeats the forward's q, k, v all-to-all instead of the attention.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from megaeff.distributed.comm import all_to_all
from megaeff.distributed.context_parallel.blocks import SequenceEngine, plan_blocks
from megaeff.distributed.context_parallel.sharding import ContextParallelError, num_chunks, rank_chunks


def check_heads(Hq: int, Hkv: int, P: int) -> None:
    if Hq % P:
        raise ContextParallelError(
            "model.n_heads", f"ulysses splits heads over cp: the query heads (Hq={Hq}) must be divisible by cp={P}"
        )
    if Hkv % P:
        raise ContextParallelError(
            "model.n_kv_heads",
            f"ulysses splits heads over cp: the key/value heads (Hkv={Hkv}) must be divisible by cp={P}",
        )


class UlyssesEngine(SequenceEngine):
    impl = "ulysses"

    def _chunk_slices(self, T: int):
        """(source/destination rank p, global token slice, slice in p's shard) for every chunk of the layout: the
        permutation between rank-after-rank order and sequence order, applied by slice copies (no index copy)."""
        P = self.cg.size
        c = T // num_chunks(P, self.sharding)
        return [
            (p, slice(g * c, (g + 1) * c), slice(j * c, (j + 1) * c))
            for p in range(P)
            for j, g in enumerate(rank_chunks(P, p, self.sharding))
        ]

    def to_heads(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """[B, H_i, T/P, D] sequence shards -> [B, H_i/P, T, D] head shards in sequence order (one all-to-all).
        Two buffers of the payload's size are alive at any time (send + receive, then receive + result)."""
        P = self.cg.size
        B, _, Tl, D = tensors[0].shape
        heads = [t.shape[1] // P for t in tensors]
        send = torch.cat([t.reshape(B, P, h, Tl, D).transpose(0, 1) for t, h in zip(tensors, heads)], dim=2)
        recv = all_to_all(send, self.cg)  # [P (source rank = sequence shard), B, sum h, Tl, D]
        del send
        full = recv.new_empty((B, sum(heads), P * Tl, D))
        for p, glob, loc in self._chunk_slices(P * Tl):
            full[:, :, glob] = recv[p, :, :, loc]
        return list(full.split(heads, dim=1))

    def to_sequence(self, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """The inverse of `to_heads`: [B, H_i/P, T, D] -> [B, H_i, T/P, D]. Packs the inputs straight into the
        send buffer and releases each one from `tensors` (which is left holding None) once packed, so a caller
        that passes its only references frees them before the receive buffer exists."""
        P = self.cg.size
        B, _, T, D = tensors[0].shape
        Tl = T // P
        heads = [t.shape[1] for t in tensors]
        send = tensors[0].new_empty((P, B, sum(heads), Tl, D))  # [P (destination), B, sum h, Tl, D]
        off = 0
        for i, h in enumerate(heads):
            t, tensors[i] = tensors[i], None
            for p, glob, loc in self._chunk_slices(T):
                send[p, :, off : off + h, loc] = t[:, :, glob]
            off += h
            del t
        recv = all_to_all(send, self.cg)  # [P (source rank = head group), B, sum h, Tl, D]
        del send
        parts = recv.split(heads, dim=2)
        return [p.transpose(0, 1).reshape(B, P * h, Tl, D) for p, h in zip(parts, heads)]

    def _check(self, q, k):
        check_heads(q.shape[1], k.shape[1], self.cg.size)

    def inputs(self, q, k, v):
        self._check(q, k)
        return tuple(self.to_heads([q, k, v]))

    @staticmethod
    def _plan(T):
        return plan_blocks([0], [0], T)  # one causal block: all of the sequence, this rank's heads

    def forward(self, q, k, v, want_lse: bool = False, out=None):
        qh, kh, vh = self.inputs(q, k, v)
        (blk,) = self._plan(qh.shape[2])
        oh, lseh = self.kernel.forward(qh, kh, vh, blk.causal)
        self.count_forward(blk, qh.shape[0] * qh.shape[1])
        oh = oh.to(q.dtype)
        out = self.finish(self.to_sequence([oh])[0], q.dtype, out)
        lse = self.to_sequence([lseh.unsqueeze(-1)])[0].squeeze(-1) if want_lse else None
        return out, (qh, kh, vh, oh, lseh), lse

    def backward(self, saved, dout):
        qh, kh, vh, oh, lseh = saved
        (doh,) = self.to_heads([dout])
        (blk,) = self._plan(qh.shape[2])
        delta, final_out = self.row_stats(oh, doh)
        gq, gk, gv = self.kernel.backward(qh, kh, vh, doh, lseh, delta, final_out, blk.causal)
        del doh, delta, final_out  # not needed while the gradients travel back
        self.count_backward(blk, qh.shape[0] * qh.shape[1])
        dtype = qh.dtype
        grads = [gq.to(dtype), gk.to(dtype), gv.to(dtype)]
        del gq, gk, gv  # to_sequence releases each gradient once packed into its send buffer
        dq, dk, dv = self.to_sequence(grads)
        return dq, dk, dv


def ulysses_bytes(B: int, T: int, P: int, Hq: int, Hkv: int, D: int, elem: int):
    """(forward, backward) all-to-all payload of one rank in one attention call (module docstring)."""
    if P == 1:
        return 0, 0
    one = B * (T // P) * D * elem
    return one * (2 * Hq + 2 * Hkv), one * (2 * Hq + 2 * Hkv)
