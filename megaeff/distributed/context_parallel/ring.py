"""Ring attention (zhuzilin/ring-flash-attention's schedule) over the cp group, contiguous or zigzag shards.

Forward, rank r of P, step s = 0..P-1: the key/value block held at step s belongs to rank (r - s) mod P. Before
computing on it the rank posts the transfer that passes it to rank r+1 and receives the next one from rank r-1
(one `batch_p2p`), so the transfer runs while the block is computed; then it waits and swaps buffers. Partial
outputs are merged by log-sum-exp in at least fp32 (blocks.merge_). Which query/key chunk pairs are computed
follows from the chunks' global positions (blocks.plan_blocks): with zigzag shards every rank does the same
work at every step, with contiguous shards rank r computes r + 1 of its P blocks (the diagonal one masked).
K and V travel with their Hkv heads; grouped queries are expanded nowhere.

Backward: K and V circulate again exactly as in the forward; the gradients dK, dV of the block a rank holds are
accumulated into the partial sum received from rank r-1 (who held the same block one step earlier) and passed
on to rank r+1; after P steps the last receive hands every owner its complete dK, dV. The partial sums travel
in the accumulation dtype (fp32 for bf16 inputs), so rounding does not grow with P. Each block's contribution
uses the final rows' lse and delta, so nothing is rescaled. dQ stays local.

Bytes per layer per rank ("cp/p2p_send"), B batch, T_l = T/P local tokens, D head dim, e the element size of
K/V, a that of the accumulation dtype (max(e, 4)):
    forward   (P-1) * 2 B Hkv T_l D e
    backward  (P-1) * 2 B Hkv T_l D e  +  P * 2 B Hkv T_l D a
"""

from __future__ import annotations

import torch

from megaeff.distributed.comm import batch_p2p
from megaeff.distributed.context_parallel.blocks import SequenceEngine
from megaeff.distributed.context_parallel.sharding import rank_chunks

TAG_K, TAG_V, TAG_DK, TAG_DV = 11, 12, 13, 14


class RingEngine(SequenceEngine):
    impl = "ring"

    def _layout(self, q):
        P, r = self.cg.size, self.cg.rank
        chunks = rank_chunks(P, r, self.sharding)
        return P, r, chunks, q.shape[2] // len(chunks)

    def _pass_on(self, tensors, tags):
        """Send `tensors` to the next rank, receive the same shapes from the previous one."""
        P, r = self.cg.size, self.cg.rank
        nxt = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        req = batch_p2p(
            self.cg,
            sends=[(t, (r + 1) % P, tag) for t, tag in zip(tensors, tags)],
            recvs=[(b, (r - 1) % P, tag) for b, tag in zip(nxt, tags)],
        )
        return req, nxt

    def forward(self, q, k, v, want_lse: bool = False, out=None):
        P, r, chunks, c = self._layout(q)
        acc_out, acc_lse = self.new_accumulators(q)
        kv = (k, v)
        for s in range(P):
            src = (r - s) % P
            req = None
            if s < P - 1:  # post the next block's transfer first: it runs while this block is computed
                req, nxt = self._pass_on(kv, (TAG_K, TAG_V))
            self.attend_(acc_out, acc_lse, q, kv[0], kv[1], chunks, rank_chunks(P, src, self.sharding), c)
            if req is not None:
                req.wait()
                kv = tuple(nxt)
        out = self.finish(acc_out, q.dtype, out)
        return out, (q, k, v, out, acc_lse), acc_lse if want_lse else None

    def backward(self, saved, dout):
        q, k, v, out, lse = saved
        P, r, chunks, c = self._layout(q)
        delta, final_out = self.row_stats(out, dout)
        dq = None
        kv = (k, v)
        dkv_req = dkv_in = None
        for s in range(P):
            src = (r - s) % P
            kv_req = None
            if s < P - 1:
                kv_req, nxt = self._pass_on(kv, (TAG_K, TAG_V))
            gq, gk, gv = self.attend_backward(
                q, kv[0], kv[1], dout, lse, delta, final_out, chunks, rank_chunks(P, src, self.sharding), c
            )
            if gq is not None:
                dq = gq if dq is None else dq.add_(gq)
            if dkv_req is None:  # step 0: the own block, whose diagonal is always visible
                dk_acc, dv_acc = gk, gv
            else:
                dkv_req.wait()
                dk_acc, dv_acc = dkv_in  # rank r-1's partial sums for block `src`
                if gk is not None:
                    dk_acc.add_(gk)
                    dv_acc.add_(gv)
            if kv_req is not None:
                kv_req.wait()
                kv = tuple(nxt)
            if P > 1:
                dkv_req, dkv_in = self._pass_on((dk_acc, dv_acc), (TAG_DK, TAG_DV))
        if P > 1:
            dkv_req.wait()
            dk_acc, dv_acc = dkv_in
        return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


def ring_bytes(B: int, T: int, P: int, Hkv: int, D: int, elem: int, acc_elem: int):
    """(forward, backward) bytes one rank sends in one attention call (the formulas of the module docstring)."""
    if P == 1:
        return 0, 0
    kv = 2 * B * Hkv * (T // P) * D
    return (P - 1) * kv * elem, (P - 1) * kv * elem + P * kv * acc_elem
