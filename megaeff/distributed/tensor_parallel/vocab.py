"""Vocab-parallel embedding and cross-entropy (Megatron's `VocabParallelEmbedding`, `cross_entropy.py`).

Embedding: rank i holds the rows [i V/p, (i+1) V/p) of the logical table. Ids outside the range look up row 0
and are zeroed, so the sum over tp is the full lookup: all-reduce (T h), or with sequence parallelism a
reduce-scatter straight into sequence shards (T h; its backward all-gathers T h).

Cross-entropy on logits sharded along the vocabulary (a column-parallel output head without gather_output):
the T x V logits never move. Forward: all-reduce MAX of the per-token max (T), then one all-reduce SUM of
[target logit, sum of exp] (2T); backward: softmax minus one-hot on the owning rank, no communication.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaeff.distributed.comm import CommGroup, all_gather, all_reduce
from megaeff.distributed.tensor_parallel.mappings import reduce_from_region, reduce_scatter_seq
from megaeff.layers.param_meta import ParamMeta, set_param_meta

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims


def _vocab_range(vocab: int, cg: CommGroup, what: str):
    if vocab % cg.size:
        raise ValueError(f"tensor parallelism: {what} vocab_size={vocab} must be divisible by tp={cg.size}")
    per = vocab // cg.size
    return cg.rank * per, (cg.rank + 1) * per


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dims: ParallelDims,
        *,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
    ):
        super().__init__()
        self.cg = dims.comm("tp")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.start, self.end = _vocab_range(num_embeddings, self.cg, "embedding")
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.weight = nn.Parameter(torch.empty(self.end - self.start, embedding_dim))
        set_param_meta(self.weight, ParamMeta(tp_split="rows", logical_shape=(num_embeddings, embedding_dim)))

    @classmethod
    def from_logical(cls, embedding: nn.Embedding, dims: ParallelDims, **kw) -> "VocabParallelEmbedding":
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, dims, **kw).to(
            embedding.weight.device, embedding.weight.dtype
        )
        layer.load_logical(embedding.weight)
        return layer

    def load_logical(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(weight[self.start : self.end])

    def init_weights(self, prefix: str, init) -> None:
        full = torch.empty(self.num_embeddings, self.embedding_dim)
        init(f"{prefix}.weight", full)  # the logical N(0, std) draw of the dense table
        self.load_logical(full)

    # The same interface as the TP linear layers (megaeff/distributed/tensor_parallel/base.py) for checkpoints and
    # norms.
    def split_of(self, name: str) -> str:
        return "rows"

    def shard_logical(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.start : self.end]

    def gather(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return all_gather(tensor, self.cg, 0)

    def logical_shape(self, name: str) -> torch.Size:
        return torch.Size((self.num_embeddings, self.embedding_dim))

    def shard_offset(self, name: str) -> Tuple[int, ...]:
        """Where this rank's rows start in the logical table (as the TP linear layers' `shard_offset`)."""
        return (self.start, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_seq(out, self.cg, self.seq_dim)
        return reduce_from_region(out, self.cg)

    def extra_repr(self) -> str:
        return (
            f"vocab {self.num_embeddings} (rows {self.start}:{self.end}), dim {self.embedding_dim}, tp={self.cg.size}"
        )


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, cg, start, ignore_index):
        # The max only stabilizes exp; it needs no gradient (the loss does not depend on it).
        lmax = all_reduce(logits.max(-1).values, cg, op=dist.ReduceOp.MAX)
        shifted = logits - lmax.unsqueeze(-1)
        local = target - start
        mine = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~mine, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * mine
        exp = shifted.exp()
        sums = all_reduce(torch.stack([picked, exp.sum(-1)]), cg)
        loss = sums[1].log() - sums[0]
        ignored = target == ignore_index
        loss = loss.masked_fill(ignored, 0.0)
        softmax = exp.div_(sums[1].unsqueeze(-1))
        ctx.save_for_backward(softmax, local, mine & ~ignored, ignored)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        softmax, local, hit, ignored = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit.to(grad.dtype).unsqueeze(-1))
        grad.mul_(dloss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, dims: ParallelDims, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token loss (0 at ignore_index) from vocab-sharded logits [..., V/p]; the caller sums or averages
    (the trainer normalizes by the global token count). Equals F.cross_entropy(full logits, reduction='none')."""
    cg = dims.comm("tp")
    vocab = logits.shape[-1] * cg.size
    start, _ = _vocab_range(vocab, cg, "output head")
    return _VocabParallelCE.apply(logits, target, cg, start, ignore_index)
