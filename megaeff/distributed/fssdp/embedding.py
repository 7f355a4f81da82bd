"""FSSDP's embedding: materialize only the rows of the tokens in the batch (Hecate's sparse all-gather).

A forward looks up at most (tokens in the micro-batch) rows of the embedding table, so gathering the whole table
(vocab x dim, a third of LLaMA-60M) is what dense FSDP does and FSSDP need not. The table is sharded by rows like
every tensor (megaeff/distributed/fssdp/layout.py); a forward then

1. takes the distinct token ids of this rank's micro-batch (sorted, so they come grouped by owner rank),
2. exchanges how many ids each rank wants from each other one (an all-to-all of p counts) and the ids (an
   uneven all-to-all of int64; token ids are data, not model structure, and are counted as `all_to_all`),
3. receives the rows from their owners (an uneven all-to-all, `sparse_all_gather`) in the gather dtype (FP8: one
   scale per 1 x 128 group of each block of rows sent), and
4. looks the tokens up in that small table.

Backward sends each row's gradient back to its owner (`sparse_reduce_scatter`, in the reduce dtype), which adds
the contributions in source-rank order into its shard's `.grad`: summed, never averaged. With deferred
accumulation the rows of non-final micro-batches are kept (ids and gradient rows, not the table) and summed
locally in micro-batch order before the one exchange of the final micro-batch, DP's order. Bytes recorded
follow megaeff/distributed/comm.py's all-to-all rule: what this rank sends.

Only a plain `nn.Embedding` (no padding_idx, max_norm or sparse gradients) whose weight FSSDP shards over the
whole dp_cp group takes this path; any other embedding is gathered whole with its unit.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megaeff.distributed.comm import CommGroup, all_to_all, all_to_all_uneven
from megaeff.distributed.fssdp.layout import E4M3, REDUCE_DTYPES, TensorShard, fp8_decode, fp8_encode
from megaeff.distributed.fssdp.tally import ByteTally
from megaeff.precision.group_quant import GroupLayout


def eligible(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Embedding)
        and type(module).forward is nn.Embedding.forward
        and module.padding_idx is None
        and module.max_norm is None
        and not module.sparse
    )


def _fp8_bytes(n_rows: int, dim: int) -> int:
    return 0 if n_rows == 0 else 4 * GroupLayout.for_shape((n_rows, dim)).n_groups + n_rows * dim


class SparseRows:
    """The row-wise materialization of one sharded embedding table (see the module docstring).

    Bytes go to `tally` (shared with the FSSDP engine and gradient sync); `sync.accumulating` (the gradient
    sync's) says whether a backward keeps its rows for a later micro-batch; `after_lookup` runs after every
    forward (the engine starts gathering the first block)."""

    def __init__(
        self,
        module: nn.Module,
        spec: TensorShard,
        param: nn.Parameter,
        cg: CommGroup,
        *,
        tally: ByteTally,
        sync,
        after_lookup: Callable[[], None],
        gather_dtype: str = "fp32",
        reduce_dtype: str = "fp32",
    ):
        self.module, self.spec, self.param, self.cg = module, spec, param, cg
        self.tally, self.sync, self.after_lookup = tally, sync, after_lookup
        self.gather_dtype, self.reduce_dtype = gather_dtype, reduce_dtype
        self.dim = spec.full_shape[1]
        self.bounds = torch.tensor([b for _, b in spec.bounds])
        self.start = spec.bounds[spec.me][0]
        self.pending: List[Tuple[torch.Tensor, torch.Tensor]] = []  # deferred micro-batches: (ids, grad rows)
        self.rows_received = 0  # rows materialized since the last finish()

    # ------------------------------------------------------------------ exchanges
    def _route(self, ids: torch.Tensor) -> Tuple[List[int], List[int], torch.Tensor]:
        """Sorted distinct `ids` -> (how many go to each owner, how many each rank asks of me, the ids asked)."""
        owner = torch.bucketize(ids, self.bounds.to(ids.device), right=True)
        counts = torch.bincount(owner, minlength=self.cg.size).to(torch.int64)
        self.tally.count("all_to_all", counts.numel() * 8 + ids.numel() * 8, self.cg)
        asked = all_to_all(counts, self.cg)
        send, recv = counts.tolist(), asked.tolist()
        return send, recv, all_to_all_uneven(ids.to(torch.int64), self.cg, send, recv, kind="all_to_all")

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows `ids` (sorted, distinct) of the logical table, from their owners."""
        send, recv, wanted = self._route(ids)
        rows = self.param.detach()[wanted - self.start]
        gd = self.gather_dtype
        if gd == "fp8":
            parts, sizes = [], []
            for block in rows.split(recv):
                if block.shape[0]:
                    codes, scale = fp8_encode(block)
                    parts += [scale.view(torch.uint8), codes.reshape(-1).view(torch.uint8)]
                sizes.append(_fp8_bytes(block.shape[0], self.dim))
            payload = torch.cat(parts) if parts else rows.new_empty(0, dtype=torch.uint8)
            self.tally.count("sparse_all_gather", payload.numel(), self.cg)
            got = all_to_all_uneven(
                payload, self.cg, sizes, [_fp8_bytes(n, self.dim) for n in send], kind="sparse_all_gather"
            )
            out, off = [], 0
            for n in send:
                if n:
                    g = GroupLayout.for_shape((n, self.dim)).n_groups
                    scale = got[off : off + 4 * g].clone().view(torch.float32)
                    codes = got[off + 4 * g : off + 4 * g + n * self.dim].clone().view(E4M3.dtype).view(n, self.dim)
                    out.append(fp8_decode(codes, scale))
                    off += 4 * g + n * self.dim
            table = torch.cat(out) if out else rows.new_empty(0, self.dim)
        else:
            served = rows.to(torch.bfloat16 if gd == "bf16" else rows.dtype)
            self.tally.count("sparse_all_gather", served.numel() * served.element_size(), self.cg)
            table = all_to_all_uneven(served, self.cg, recv, send, kind="sparse_all_gather").to(self.param.dtype)
        self.rows_received += ids.numel()
        return table

    def reduce(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """Send the gradient rows of `ids` to their owners; add what this rank receives into its shard's grad."""
        send, recv, wanted = self._route(ids)
        sent = grad.to(REDUCE_DTYPES[self.reduce_dtype])
        self.tally.count("sparse_reduce_scatter", sent.numel() * sent.element_size(), self.cg)
        got = all_to_all_uneven(sent, self.cg, send, recv, kind="sparse_reduce_scatter")
        g = torch.zeros_like(self.param).index_add_(0, wanted - self.start, got.to(self.param.dtype))
        self.param.grad = g if self.param.grad is None else self.param.grad.add_(g)

    def backward(self, ids: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
        if grad is None:
            grad = torch.zeros(ids.numel(), self.dim, dtype=self.param.dtype, device=ids.device)
        self.pending.append((ids, grad))
        if not self.sync.accumulating:
            self.flush()

    def flush(self) -> None:
        """Reduce the pending micro-batches: their rows summed in micro-batch order, then one exchange."""
        if not self.pending:
            return
        if len(self.pending) == 1:
            ids, grad = self.pending[0]
        else:
            every = torch.cat([i for i, _ in self.pending])
            ids, where = torch.unique(every, sorted=True, return_inverse=True)
            grad = torch.zeros(ids.numel(), self.dim, dtype=self.param.dtype, device=every.device)
            grad.index_add_(0, where, torch.cat([g for _, g in self.pending]))
        self.pending = []
        self.reduce(ids, grad)

    # ------------------------------------------------------------------ the module's forward
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids, where = torch.unique(tokens.reshape(-1), sorted=True, return_inverse=True)
        if torch.is_grad_enabled() and self.param.requires_grad:
            table = _SparseGather.apply(self, ids, self.param)
        else:
            table = self.gather(ids)
        self.after_lookup()
        return F.embedding(where.view(tokens.shape), table)


class _SparseGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: SparseRows, ids: torch.Tensor, shard: torch.Tensor):
        ctx.rows = rows
        ctx.save_for_backward(ids)
        ctx.set_materialize_grads(False)
        return rows.gather(ids)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        ctx.rows.backward(ids, grad)
        return None, None, None
