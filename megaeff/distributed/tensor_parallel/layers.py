"""Tensor (and sequence) parallelism for every linear method, plus the vocab-parallel embedding and loss.

    parallel_linear(layer, dims, "column" | "row", sequence_parallel=..., gather_output=...)

returns this rank's shard of a single-process layer of megaeff/layers (`from_logical`); `init_weights` on the
result re-derives the shard from the seed, so shards concatenate to exactly the single-process tensors.
Column-parallel layers take a replicated input (with SP: its sequence shard) and return their output-feature
shard; row-parallel layers take their input-feature shard and return the replicated output (with SP: its
sequence shard). Sequence parallelism (Megatron-SP) keeps activations sharded along the sequence outside the TP
regions: an all-gather replaces the column layer's identity and a reduce-scatter the row layer's all-reduce.

Layouts. n = in_features, m = out_features, r = rank, k = LOST channels, T = tokens per call (b s), p = tp,
e = bytes per element. Bytes are `comm.py` payloads (the full logical tensor of each collective), per call
on every rank; "grad AR" is the all-reduce of a replicated parameter's token-partial gradient.

| method  | style  | sharded          | replicated | no SP: fwd / bwd         | SP: fwd / bwd                          |
|---------|--------|------------------|------------|--------------------------|----------------------------------------|
| dense   | column | W rows           | -          | - / AR T n               | AG T n / RS T n                        |
| dense   | row    | W cols           | -          | AR T m / -               | RS T m / AG T m                        |
| lowrank | column | B rows           | A          | - / AR T r               | AG T r / RS T r + grad AR r n          |
| lowrank | row    | A cols           | B          | AR T r / -               | RS T r / AG T r + grad AR m r          |
| sltrain | column | B rows, S rows   | A          | - / AR T n + grad AR r n | AG T n / RS T n + grad AR r n          |
| sltrain | row    | A cols, S cols   | B          | AR T m / grad AR m r     | RS T m / AG T m + grad AR m r          |
| lost    | column | B rows, W_s rows | A, I       | - / AR T (r+k)           | AG T(r+k) / RS T(r+k) + grad AR r n    |
| lost    | row    | A cols*          | B, W_s, I  | AR T (r+k) / -           | RS T(r+k) / AG T(r+k) + grad AR m(r+k) |

(AR all-reduce, AG all-gather, RS reduce-scatter; S = SLTrain's sparse values, split by the logical support;
I = LOST's channel set, W_s its m x k block; *: x_I by its owner.) Why each layout is what it is:
megaeff/distributed/tensor_parallel/factored.py.
For comparison Megatron's dense pair moves AR T n + AR T m per layer pair; lowrank and LOST move rank-sized
intermediates instead (r, k << n, m), SLTrain the dense activations plus one factor gradient.

Vocab: `VocabParallelEmbedding` (rows of the table by vocab range; AR T h, or RS T h with SP) and
`vocab_parallel_cross_entropy` (3 T-sized all-reduces, logits never gathered), in tp_vocab.py.
`check_tp_layout` rejects model shapes a tp degree cannot split, naming the config field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from megaeff.config.parallel import check_tp_layout
from megaeff.distributed.tensor_parallel.base import STYLES, DenseTP, TPLinear
from megaeff.distributed.tensor_parallel.factored import LostTP, LowRankTP, SLTrainTP
from megaeff.distributed.tensor_parallel.vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims

TP_CLASSES = {cls.method: cls for cls in (DenseTP, LowRankTP, SLTrainTP, LostTP)}

__all__ = [
    "STYLES",
    "TP_CLASSES",
    "TPLinear",
    "DenseTP",
    "LowRankTP",
    "SLTrainTP",
    "LostTP",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "parallel_linear",
    "check_tp_layout",
]


def parallel_linear(
    layer: nn.Module,
    dims: ParallelDims,
    style: str,
    *,
    sequence_parallel: bool = False,
    gather_output: bool = False,
    seq_dim: int = 1,
) -> TPLinear:
    """This rank's `style`-parallel shard of a factory-built layer (megaeff.layers.linear.build_linear)."""
    try:
        cls = TP_CLASSES[layer.method]
    except (KeyError, AttributeError):
        raise ValueError(
            f"no tensor-parallel form for {type(layer).__name__}; available: {', '.join(TP_CLASSES)}"
        ) from None
    return cls.from_logical(
        layer, dims, style, sequence_parallel=sequence_parallel, gather_output=gather_output, seq_dim=seq_dim
    )
