"""Tensor-parallel lowrank, SLTrain and LOST layers: the compact tensors are sharded, never a dense weight.

Notation: input width n, output width m, rank r, tokens T per call, tp degree p; the layouts and the bytes of
every call are tabulated in megaeff/distributed/tensor_parallel/layers.py. The idea throughout: a factorized layer
can communicate its rank-r intermediate (T x r) where Megatron communicates a full activation (T x n or T x m),
as long as nothing between the factors needs the full activation. SLTrain's sparse part needs the full input
(column) or produces a full-width partial output (row), so SLTrain keeps Megatron's activation collectives and
all-reduces the gradient of its one replicated factor instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch

from megaeff.distributed.comm import all_gather_uneven
from megaeff.distributed.tensor_parallel.base import TPLinear
from megaeff.distributed.tensor_parallel.mappings import gather_seq, reduce_from_region, reduce_scatter_seq
from megaeff.layers.sltrain_ops import DensifyMatmul, SparseMatmul, sparse_token_limit

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims


class LowRankTP(TPLinear):
    """column: B's rows sharded, A replicated. h = x A^T is computed redundantly and enters the region by
    copy_to_region (its gradient, partial per output shard, is all-reduced: T r), which makes dA and dx complete
    on every rank with no other collective. With SP: h of the local tokens is all-gathered (T r) instead, and
    A's token-partial gradient is all-reduced (r n).
    row: A's columns sharded, B replicated. The rank-r partial sums x_i A_i^T are all-reduced (T r) instead of
    the T x m output; with SP they are reduce-scattered (T r) and B's token-partial gradient all-reduced (m r)."""

    method = "lowrank"
    SPLITS = {"A": {"column": "replicated", "row": "cols"}, "B": {"column": "rows", "row": "replicated"}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops, cg, sd = self.ops, self.cg, self.seq_dim
        if self.style == "column":
            if self.sequence_parallel:
                h = gather_seq(ops.linear(x, self.shared(self.A)), cg, sd)
            else:
                h = self.enter(ops.linear(x, self.A))
            return self.finish(ops.linear(h, self.B))
        h = self.leave(ops.linear(x, self.A))
        B = self.shared(self.B) if self.sequence_parallel else self.B
        return ops.linear(h, B)


class SLTrainTP(TPLinear):
    """W = s B A + S computed shard by shard: each rank runs SLTrain's own kernels (either path) on its slice
    of W, which is s B_i A + S_i (column: rows) or s B A_i + S_i (row: columns).
    column: B's rows and S's rows sharded, A replicated with its gradient all-reduced (r n); input as Megatron
    (backward all-reduce T n, or all-gather + reduce-scatter T n with SP).
    row: A's columns and S's columns sharded, B replicated with its gradient all-reduced (m r); output as
    Megatron (all-reduce T m, or reduce-scatter + all-gather T m with SP).
    The support is the logical one (regenerated from the seed); a shard keeps the entries in its rows/columns
    with their positions re-based to the local slice, so no index is ever sent."""

    method = "sltrain"
    gathers_input = True
    SPLITS = {
        "A": {"column": "replicated", "row": "cols"},
        "B": {"column": "rows", "row": "replicated"},
        "sparse_values": {"column": "support", "row": "support"},
    }

    def __init__(self, logical, dims: ParallelDims, style, **kw):
        super().__init__(logical, dims, style, **kw)
        self.rank, self.scale, self.path = logical.rank, logical.scale, logical.path
        self.register_buffer("sparse_index", torch.empty(0, dtype=torch.int32), persistent=False)
        self.register_buffer("index_checksum", torch.zeros((), dtype=torch.int64))
        # Where this shard's entries sit in the logical (sorted) value vector, and its length: enough to cut a
        # logical vector (a checkpoint's values or their optimizer state) without the logical support.
        self.register_buffer("logical_positions", torch.empty(0, dtype=torch.int64), persistent=False)
        self.logical_nnz = 0

    def _support_mask(self, index: torch.Tensor) -> torch.Tensor:
        n, r = self.in_features, self.cg.rank
        idx = index.to(torch.int64)
        if self.style == "column":
            rows = idx // n
            return (rows >= r * self.local_out) & (rows < (r + 1) * self.local_out)
        cols = idx % n
        return (cols >= r * self.local_in) & (cols < (r + 1) * self.local_in)

    def _local_index(self, index: torch.Tensor) -> torch.Tensor:
        """Logical flat positions (in this shard) -> flat positions in the local m_l x n_l slice, still sorted."""
        n, r, idx = self.in_features, self.cg.rank, index.to(torch.int64)
        if self.style == "column":
            return (idx - r * self.local_out * n).to(torch.int32)
        rows, cols = idx // n, idx % n
        return (rows * self.local_in + cols - r * self.local_in).to(torch.int32)

    def _global_index(self, local: torch.Tensor) -> torch.Tensor:
        n, r, idx = self.in_features, self.cg.rank, local.to(torch.int64)
        if self.style == "column":
            return idx + r * self.local_out * n
        rows, cols = idx // self.local_in, idx % self.local_in
        return rows * n + cols + r * self.local_in

    def shard(self, name, tensor, logical):
        if name != "sparse_values":
            return super().shard(name, tensor, logical)
        if tensor.is_meta:  # the size is data-dependent: known once the support exists (init_weights)
            return tensor.new_empty(0)
        return tensor[self._support_mask(logical.sparse_index)]

    def _load_buffers(self, logical):
        if logical.sparse_index.is_meta:
            return
        mask = self._support_mask(logical.sparse_index)
        self.sparse_index = self._local_index(logical.sparse_index[mask]).to(self.sparse_values.device)
        self.logical_positions = mask.nonzero().squeeze(1).to(self.sparse_values.device)
        self.logical_nnz = int(logical.sparse_index.numel())
        self.index_checksum = logical.index_checksum.detach().clone()

    def shard_logical(self, name, tensor):
        if name != "sparse_values":
            return super().shard_logical(name, tensor)
        return tensor[self.logical_positions.to(tensor.device)]

    def logical_shape(self, name):
        return torch.Size((self.logical_nnz,)) if name == "sparse_values" else super().logical_shape(name)

    def shard_offset(self, name: str) -> Tuple[int, ...]:
        """As TPLinear's; for the sparse values of a column-parallel layer (a rows split), where this rank's
        entries start in the logical value vector: the support is sorted row-major, so the entries of a run of
        rows are a contiguous run of it. A row-parallel layer's entries (a run of columns of every row) are not:
        ValueError. An empty shard starts at 0."""
        if name != "sparse_values":
            return super().shard_offset(name)
        pos = self.logical_positions
        if self.style != "column":
            raise ValueError(f"{self.name or 'sltrain'}: the sparse values of a row-parallel layer are not contiguous")
        if pos.numel() and int(pos[-1]) - int(pos[0]) + 1 != pos.numel():  # guards the sorted-support invariant
            raise AssertionError(f"{self.name}: this rank's sparse values are not a contiguous run of the support")
        return (int(pos[0]) if pos.numel() else 0,)

    def gather(self, name, tensor):
        if name != "sparse_values":
            return super().gather(name, tensor)
        # Values and their logical positions from every rank, put back in the logical (sorted) order.
        values = torch.cat(all_gather_uneven(tensor, self.cg))
        positions = torch.cat(all_gather_uneven(self._global_index(self.sparse_index), self.cg))
        return values[positions.argsort()]

    @property
    def nnz(self) -> int:
        return self.sparse_values.numel()

    def _local(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """SLTrainLinear.forward on the local slice (same path rule, on the local shape and support)."""
        m, n, ops = self.local_out, self.local_in, self.ops
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n)
        path = self.path
        if path == "auto":
            limit = sparse_token_limit(m, n, self.rank, self.nnz, torch.is_grad_enabled())
            path = "sparse" if x2.shape[0] < limit else "dense"
        if path == "dense":
            y = DensifyMatmul.apply(x2, A, B, self.sparse_values, self.sparse_index, self.scale, ops)
        else:
            low = ops.linear(ops.linear(x2, A * self.scale), B)
            y = low + SparseMatmul.apply(x2, self.sparse_values, self.sparse_index, m, n, ops).to(low.dtype)
        return y.reshape(*lead, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "column":
            return self.finish(self._local(self.enter(x), self.shared(self.A), self.B))
        return self.leave(self._local(x, self.A, self.shared(self.B)))


class LostTP(TPLinear):
    """y = g f(x A^T) B^T + (1-g) x[:, I] W_s^T.
    column: B's and W_s's rows sharded; A and the channel set I replicated. f(x A^T) and x[:, I] are computed
    redundantly and enter the region together, [f(z), x_I] (T x (r+k)): backward all-reduces their partial
    gradients (T (r+k)); with SP the local tokens' [f(z), x_I] is all-gathered and reduce-scattered (T (r+k))
    and A's token-partial gradient all-reduced (r n).
    row: A's columns sharded; B and W_s replicated. f needs the complete z = x A^T, so the rank-r partial sums
    are reduced before f, fused in one collective with the channel block: each rank fills the selected channels
    it owns (zeros elsewhere), so the sum is x[:, I]. One all-reduce of T (r+k) forward; with SP a
    reduce-scatter (T (r+k)), its all-gather in backward, and the token-partial gradients of B (m r) and W_s
    (m k) all-reduced. Static shapes: a channel not owned is masked, not skipped, so nothing syncs with the host."""

    method = "lost"
    parallel_init = True  # the logical init runs an SVD; models/init.py runs such inits in threads
    SPLITS = {
        "A": {"column": "replicated", "row": "cols"},
        "B": {"column": "rows", "row": "replicated"},
        "sparse_weight": {"column": "rows", "row": "replicated"},
    }

    def __init__(self, logical, dims: ParallelDims, style, **kw):
        super().__init__(logical, dims, style, **kw)
        self.rank, self.k, self.gamma, self.act = logical.rank, logical.k, logical.gamma, logical.act
        self.register_buffer("channel_index", torch.empty(self.k, dtype=torch.int32), persistent=False)
        self.register_buffer("index_checksum", torch.zeros((), dtype=torch.int64))
        # row: for each selected channel, its column in this rank's input slice (clamped) and whether it owns it.
        self.register_buffer("local_channel", torch.zeros(self.k, dtype=torch.int32), persistent=False)
        self.register_buffer("owned", torch.zeros(self.k), persistent=False)

    def _load_buffers(self, logical):
        if logical.channel_index.is_meta:
            return
        dev = self.A.device
        index = logical.channel_index.to(torch.int64)
        self.channel_index = logical.channel_index.detach().clone().to(dev)
        self.index_checksum = logical.index_checksum.detach().clone().to(dev)
        lo = self.cg.rank * self.local_in if self.style == "row" else 0
        own = (index >= lo) & (index < lo + self.local_in)
        self.local_channel = (index - lo).clamp(0, self.local_in - 1).to(torch.int32).to(dev)
        self.owned = own.to(self.A.dtype).to(dev)

    def _act(self, z):
        return self.ops.silu(z) if self.act == "silu" else z

    def _mix(self, u, xs, B, Ws):
        ops = self.ops
        return self.gamma * ops.linear(u, B) + (1.0 - self.gamma) * ops.linear(xs, Ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops, cg, sd, r = self.ops, self.cg, self.seq_dim, self.rank
        if self.style == "column":
            A = self.shared(self.A) if self.sequence_parallel else self.A
            v = torch.cat([self._act(ops.linear(x, A)), x.index_select(-1, self.channel_index)], -1)
            v = gather_seq(v, cg, sd) if self.sequence_parallel else self.enter(v)
            u, xs = v.split([r, self.k], -1)
            return self.finish(self._mix(u, xs, self.B, self.sparse_weight))
        mine = x.index_select(-1, self.local_channel) * self.owned.to(x.dtype)
        v = torch.cat([ops.linear(x, self.A), mine], -1)
        v = reduce_scatter_seq(v, cg, sd) if self.sequence_parallel else reduce_from_region(v, cg)
        z, xs = v.split([r, self.k], -1)
        if self.sequence_parallel:
            return self._mix(self._act(z), xs, self.shared(self.B), self.shared(self.sparse_weight))
        return self._mix(self._act(z), xs, self.B, self.sparse_weight)
