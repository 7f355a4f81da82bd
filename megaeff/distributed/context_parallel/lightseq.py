"""LightSeq DistAttn (RulinShao/LightSeq `_lightseq_forward` / `_lightseq_backward`): a load-balanced causal
schedule over contiguous shards in which ranks that run out of their own work compute blocks for later ranks.

Rank r holds chunk r of P (P even). Causal block (i, j), j <= i, is chunk i's queries against chunk j's keys;
rank r owns r + 1 of them, so a plain ring leaves rank P-1 with P blocks and rank 0 with one. The schedule has
P/2 + 1 compute steps t = 0..P/2 (`action`):
- t = 0: every rank computes its own diagonal block;
- local: rank r >= min(P/2, t) computes its queries against the keys of rank r - t, sent to it directly by
  their owner (keys are not relayed around a ring);
- help: rank r < P/2 with r < t < P/2 receives the queries of rank r - t + P and computes them against its own
  keys; the partial (out, lse) goes back to the owner one step later and is merged there by log-sum-exp;
- idle: rank r < P/2 at t = P/2.
Every causal block is computed exactly once; ranks below P/2 compute P/2 blocks, the others P/2 + 1
(`lightseq_block_counts`), against r + 1 for the ring. Each transfer is posted one step before the compute that
consumes it (and results one step after the compute that produced them), so all of it overlaps compute; step
P/2 + 1 only flushes the last returns.

Backward, same steps: local blocks re-receive the keys, accumulate dQ locally and return the dK/dV deltas to the
key owner a step later; helpers receive (q, dO, lse, delta) of the owner's chunk, add dK/dV to their own
gradients and return the dQ delta. (LightSeq sends the output O; delta = rowsum(dO * O) is what the math
kernel's backward uses, so with it delta is sent instead: B Hq T_l numbers instead of B Hq T_l D. The fused
kernels of flash_blocks.py compute delta from O inside their backward, so with them O is sent, as LightSeq does.)

Rematerialization-aware checkpointing (LightSeq's `CheckpointFunctionEndWithFlashAttention`) lives in
context_parallel.py: the saved state here is (q, k, v, out, lse), so a recomputed segment can rebuild q, k, v and
take (out, lse) from its first run, and the backward above runs without a second attention forward.

Bytes per layer sent by rank r ("cp/p2p_send"), T_l = T/P, h = P/2, e the input and a the accumulation element
size, with n_kv(r) = min(h, P-1-r) key blocks sent, n_q(r) = max(0, r-h) helpers received,
n_help(r) = max(0, h-1-r) blocks computed for others, n_loc(r) = min(h, r) remote key blocks used:
    forward   n_kv 2 B Hkv T_l D e + n_q B Hq T_l D e + n_help B Hq T_l (D+1) a
    backward  n_kv 2 B Hkv T_l D e + n_q B Hq T_l (2 D e + 2 a) + n_help B Hq T_l D a + n_loc 2 B Hkv T_l D a
(backward with a kernel that takes O instead of delta: n_q B Hq T_l (3 D e + a) for the query bundle)
"""

from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch

from megaeff.distributed.comm import batch_p2p
from megaeff.distributed.context_parallel.blocks import SequenceEngine, acc_dtype, merge_
from megaeff.distributed.context_parallel.sharding import ContextParallelError

TAG_K, TAG_V, TAG_Q, TAG_O, TAG_L, TAG_DO, TAG_D, TAG_DQ, TAG_DK, TAG_DV = range(21, 31)


def check_lightseq(P: int, sharding: str) -> None:
    if sharding != "contiguous":
        raise ContextParallelError(
            "parallel.cp_sharding", f"lightseq balances contiguous shards itself; got sharding={sharding!r}"
        )
    if P > 1 and P % 2:
        raise ContextParallelError("parallel.cp", f"lightseq's schedule needs an even cp degree, got cp={P}")


def action(P: int, r: int, t: int) -> Tuple[str, int]:
    """What rank r computes at step t (0 <= t <= P/2): ("diag", r), ("local", key owner), ("help", query owner)
    or ("idle", -1)."""
    h = P // 2
    if t == 0:
        return ("diag", r)
    if r >= min(h, t):
        return ("local", r - t)
    if t == h:
        return ("idle", -1)
    return ("help", r - t + P)


def lightseq_block_counts(P: int) -> List[int]:
    """Blocks each rank computes (forward, and again in backward)."""
    return [sum(action(P, r, t)[0] != "idle" for t in range(P // 2 + 1)) for r in range(P)]


def _peers(P: int, t: int, kind: str, owner: int) -> List[int]:
    """Ranks whose step-t action is (kind, owner): who needs `owner`'s data at t, or owes it a result of t."""
    if not 0 <= t <= P // 2:
        return []
    return [x for x in range(P) if x != owner and action(P, x, t) == (kind, owner)]


def _own_action(P: int, r: int, t: int) -> Tuple[str, int]:
    return action(P, r, t) if 0 <= t <= P // 2 else ("none", -1)


class Spec(NamedTuple):
    """Shape of a receive buffer, without allocating a template tensor."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def _buffers(like):
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like]


class LightSeqEngine(SequenceEngine):
    impl = "lightseq"

    def _post(self, t, kv, bundle, bundle_tags, pending, returns):
        """Post step t's transfers: what step t+1 consumes (keys for local blocks, the query bundle for help
        blocks), the results this rank produced at step t-1 (`pending`: peer, tensors, tags), and the receives
        of the results others produced for it at t-1 (`returns`: kind -> (like, tags)). One batch, no wait."""
        P, r = self.cg.size, self.cg.rank
        sends, recvs, arrived = [], [], {}
        for x in _peers(P, t + 1, "local", r):
            sends += [(p, x, tag) for p, tag in zip(kv, (TAG_K, TAG_V))]
        for x in _peers(P, t + 1, "help", r):
            sends += [(p, x, tag) for p, tag in zip(bundle, bundle_tags)]
        kind, peer = _own_action(P, r, t + 1)
        if kind in ("local", "help"):
            like, tags = (kv, (TAG_K, TAG_V)) if kind == "local" else (bundle, bundle_tags)
            arrived[kind] = _buffers(like)
            recvs += [(b, peer, tag) for b, tag in zip(arrived[kind], tags)]
        if pending is not None:
            peer, tensors, tags = pending
            sends += [(p, peer, tag) for p, tag in zip(tensors, tags)]
        for kind, (like, tags) in returns.items():
            for x in _peers(P, t - 1, kind, r):
                bufs = _buffers(like)
                arrived.setdefault("ret_" + kind, []).append(bufs)
                recvs += [(b, x, tag) for b, tag in zip(bufs, tags)]
        return batch_p2p(self.cg, sends, recvs), arrived

    def forward(self, q, k, v, want_lse: bool = False, out=None):
        P, r = self.cg.size, self.cg.rank
        c = q.shape[2]
        acc_out, acc_lse = self.new_accumulators(q)
        acc = acc_dtype(q.dtype)
        result_like = (acc_out, acc_lse)
        kv_out, q_out = (k.contiguous(), v.contiguous()), (q.contiguous(),)  # sent up to P/2 times: copy once
        inbox, pending = {}, None
        for t in range(P // 2 + 2):
            req, arrived = self._post(t, kv_out, q_out, (TAG_Q,), pending, {"help": (result_like, (TAG_O, TAG_L))})
            pending = None
            kind, peer = _own_action(P, r, t)
            if kind == "diag":
                self.attend_(acc_out, acc_lse, q, k, v, [r], [r], c)
            elif kind == "local":
                self.attend_(acc_out, acc_lse, q, *inbox["local"], [r], [peer], c)
            elif kind == "help":
                (q_owner,) = inbox["help"]
                o, lse = self.new_accumulators(q_owner)
                self.attend_(o, lse, q_owner, k, v, [peer], [r], c)
                pending = (peer, (o, lse), (TAG_O, TAG_L))
            req.wait()
            for o, lse in arrived.pop("ret_help", []):
                merge_(acc_out, acc_lse, o.to(acc), lse.to(acc), slice(None))
            inbox = arrived
        out = self.finish(acc_out, q.dtype, out)
        return out, (q, k, v, out, acc_lse), acc_lse if want_lse else None

    def backward(self, saved, dout):
        q, k, v, out, lse = saved
        P, r = self.cg.size, self.cg.rank
        c = q.shape[2]
        delta, final_out = self.row_stats(out, dout)
        dq = dk = dv = None
        stat = final_out if delta is None else delta  # what helpers need besides q, dO, lse: O or delta
        bundle = tuple(t.contiguous() for t in (q, dout, lse, stat))
        kv_out = (k.contiguous(), v.contiguous())
        acc = lse.dtype
        dq_like = (Spec(q.shape, acc, q.device),)
        dkv_like = tuple(Spec(t.shape, acc, t.device) for t in (k, v))
        returns = {"help": (dq_like, (TAG_DQ,)), "local": (dkv_like, (TAG_DK, TAG_DV))}
        inbox, pending = {}, None
        for t in range(P // 2 + 2):
            req, arrived = self._post(t, kv_out, bundle, (TAG_Q, TAG_DO, TAG_L, TAG_D), pending, returns)
            pending = None
            kind, peer = _own_action(P, r, t)
            if kind == "diag":
                dq, dk, dv = self.attend_backward(q, k, v, dout, lse, delta, final_out, [r], [r], c)
            elif kind == "local":
                gq, gk, gv = self.attend_backward(q, *inbox["local"], dout, lse, delta, final_out, [r], [peer], c)
                dq.add_(gq)
                pending = (peer, (gk, gv), (TAG_DK, TAG_DV))
            elif kind == "help":
                q_o, dout_o, lse_o, stat_o = inbox["help"]
                delta_o, out_o = (None, stat_o) if delta is None else (stat_o, None)
                gq, gk, gv = self.attend_backward(q_o, k, v, dout_o, lse_o, delta_o, out_o, [peer], [r], c)
                dk.add_(gk)
                dv.add_(gv)
                pending = (peer, (gq,), (TAG_DQ,))
            req.wait()
            for (g,) in arrived.pop("ret_help", []):
                dq.add_(g)
            for gk, gv in arrived.pop("ret_local", []):
                dk.add_(gk)
                dv.add_(gv)
            inbox = arrived
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def lightseq_bytes(
    B: int, T: int, P: int, Hq: int, Hkv: int, D: int, elem: int, acc_elem: int, rank: int, sends_out: bool = False
):
    """(forward, backward) bytes rank `rank` sends in one attention call (the formulas of the module docstring);
    `sends_out`: the block kernel takes O instead of delta, so helpers receive O."""
    if P == 1:
        return 0, 0
    h, Tl = P // 2, T // P
    n_kv, n_q = min(h, P - 1 - rank), max(0, rank - h)
    n_help, n_loc = max(0, h - 1 - rank), min(h, rank)
    kv = 2 * B * Hkv * Tl * D
    rows = B * Hq * Tl
    fwd = n_kv * kv * elem + n_q * rows * D * elem + n_help * rows * (D + 1) * acc_elem
    bwd = (
        n_kv * kv * elem
        + n_q * rows * ((3 * D * elem + acc_elem) if sends_out else (2 * D * elem + 2 * acc_elem))
        + n_help * rows * D * acc_elem
        + n_loc * kv * acc_elem
    )
    return fwd, bwd
