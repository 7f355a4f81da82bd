"""Sequence parallelism's norm and the loss over vocab shards: the two pieces of the tensor-parallel model that
are neither a linear layer nor the embedding (megaeff/distributed/parallelize.py puts them in place).

Sequence parallelism keeps the residual stream and the norms sharded along the sequence between the TP
regions; the norm gains then see only this rank's tokens, so their gradient is all-reduced over tp in backward
(`SequenceParallelRMSNorm`, Megatron's `sequence_parallel` gradient all-reduce done inside autograd).

The head is column-parallel without gathering its output, so the loss is `vocab_parallel_cross_entropy` on the
vocab-sharded logits (`loss_sum`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from megaeff.distributed.comm import CommGroup
from megaeff.distributed.tensor_parallel.mappings import copy_to_region
from megaeff.distributed.tensor_parallel.vocab import vocab_parallel_cross_entropy
from megaeff.layers.norm import RMSNorm

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm on a sequence shard: the gain is replicated, its per-rank gradient a partial sum over tokens."""

    def __init__(self, dim: int, eps: float, cg: CommGroup, *, ops=None):
        super().__init__(dim, eps, ops=ops)
        self.cg = cg

    @classmethod
    def replacing(cls, norm: RMSNorm, cg: CommGroup) -> "SequenceParallelRMSNorm":
        with torch.device(norm.weight.device):
            return cls(norm.weight.shape[0], norm.eps, cg, ops=norm.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rmsnorm(x, copy_to_region(self.weight, self.cg), self.eps)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, dims: ParallelDims, ignore_index: int = -100) -> torch.Tensor:
    """Sum of token losses (labels equal to `ignore_index` excluded; -100 is torch's default, the trainer passes
    megaeff.data's IGNORE_INDEX); logits are vocab-sharded under tensor parallelism."""
    if dims.tp > 1:
        return vocab_parallel_cross_entropy(logits, labels, dims, ignore_index=ignore_index).sum()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
