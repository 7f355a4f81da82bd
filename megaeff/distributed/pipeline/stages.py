"""The stage split of the LLaMA model over the pp group (even or at given boundaries, virtual stages).

The model's blocks are cut into pp * v virtual stages (v model chunks per rank for the interleaved schedule);
virtual stage s lives on pipeline rank s % pp as its chunk s // pp (Megatron's order), the embedding with stage 0
and the final norm, head and loss with the last. `prune_to_stages` runs on the meta-built logical model: this rank
keeps only its blocks, still under their logical names (`layers.<i>` in a ModuleDict), so initialization, tensor
parallelism and checkpoints see the same names as in one process and no rank ever allocates the whole model.
`split_layers`' errors are the ones megaeff/config/parallel.py repeats before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Sequence, Tuple

from torch import nn

from megaeff.config.parallel import stage_cuts

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims


def split_layers(n_layers: int, pp: int, virtual: int = 1, boundaries: Sequence[int] = ()) -> List[List[int]]:
    """The block indices of each virtual stage 0 .. pp*virtual-1, in order."""
    cuts = stage_cuts(n_layers, pp, virtual, boundaries)
    edges = [0, *cuts, n_layers]
    return [list(range(a, b)) for a, b in zip(edges, edges[1:])]


@dataclass(frozen=True)
class StageChunk:
    chunk: int  # index of this model chunk on its rank
    stage: int  # virtual stage s = chunk * pp + pp_rank
    layers: Tuple[str, ...]  # keys into the pruned model's `layers` ModuleDict
    first: bool  # holds the embedding
    last: bool  # holds the final norm, the head and the loss


def stage_chunks(
    n_layers: int, dims: ParallelDims, virtual: int = 1, boundaries: Sequence[int] = ()
) -> List[StageChunk]:
    per_stage = split_layers(n_layers, dims.pp, virtual, boundaries)
    n = len(per_stage)
    return [
        StageChunk(c, s, tuple(str(i) for i in per_stage[s]), s == 0, s == n - 1)
        for c, s in enumerate(range(dims.pp_rank, n, dims.pp))
    ]


def prune_to_stages(model: nn.Module, chunks: Sequence[StageChunk]) -> nn.Module:
    """Keep this rank's blocks (by logical index), the embedding on the first stage, norm and head on the last."""
    keep = [int(k) for ch in chunks for k in ch.layers]
    model.layers = nn.ModuleDict({str(i): model.layers[i] for i in keep})
    if not any(ch.first for ch in chunks):
        model.tok_embeddings = None
    if not any(ch.last for ch in chunks):
        model.norm = None
        model.output = None
    return model
