"""How context parallelism splits a sequence over the cp group, and the global positions of every local token.

The sequence of length T is cut into equal chunks; rank r of P holds
- `contiguous`: chunk r of P chunks (what LightSeq uses; it balances the causal work with its schedule);
- `zigzag`: chunks r and 2P-1-r of 2P chunks (Megatron's and ring-flash-attention's layout), so that every rank
  holds one early and one late piece of the causal triangle and a plain ring does equal work on every rank.
With cp = 1 there is one chunk whatever the sharding (nothing to balance, no divisibility demand).

Every token tensor of a sample (inputs, labels shifted *before* sharding, loss mask, positions) is sharded with
the same function along its sequence dimension; RoPE is applied with `sequence_positions` so that each local
token rotates by its global position.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megaeff.errors import ConfigError

SHARDINGS = ("contiguous", "zigzag")


class ContextParallelError(ConfigError, ValueError):
    """A shape or option context parallelism cannot handle; names the config field to change. Also a ValueError,
    since the same check guards plain function calls on tensors."""


def check_sharding(sharding: str) -> None:
    if sharding not in SHARDINGS:
        raise ContextParallelError(
            "parallel.cp_sharding", f"unknown sharding {sharding!r}; available: {', '.join(SHARDINGS)}"
        )


def num_chunks(cp: int, sharding: str) -> int:
    """Chunks the whole sequence is cut into."""
    check_sharding(sharding)
    if cp == 1:
        return 1
    return 2 * cp if sharding == "zigzag" else cp


def rank_chunks(cp: int, rank: int, sharding: str) -> Tuple[int, ...]:
    """Global chunk indices rank `rank` holds, in local order (ascending, which the block planner relies on:
    the keys a query chunk may see are then a prefix of any rank's local keys)."""
    if not 0 <= rank < cp:
        raise ValueError(f"cp rank {rank} outside a cp group of {cp}")
    n = num_chunks(cp, sharding)
    if n == 2 * cp:
        return (rank, n - 1 - rank)
    return (rank,) if cp > 1 else (0,)


def check_seq_len(seq_len: int, cp: int, sharding: str) -> None:
    n = num_chunks(cp, sharding)
    if seq_len % n:
        why = "2*cp equal chunks" if sharding == "zigzag" else "cp equal chunks"
        raise ContextParallelError(
            "data.seq_len",
            f"sequence length {seq_len} is not divisible by {n} ({sharding} sharding over cp={cp} cuts it into {why})",
        )


def shard_sequence(x: torch.Tensor, cp: int, rank: int, sharding: str, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of `x` along `dim` ([B, T, ...] -> [B, T/cp, ...] for dim 1), as a new tensor."""
    T = x.shape[dim]
    check_seq_len(T, cp, sharding)
    pieces = x.chunk(num_chunks(cp, sharding), dim=dim)
    return torch.cat([pieces[c] for c in rank_chunks(cp, rank, sharding)], dim=dim)


def sequence_positions(
    seq_len: int, cp: int, rank: int, sharding: str, batch: Optional[int] = None, device=None
) -> torch.Tensor:
    """Global positions of this rank's tokens: [T/cp] (or [batch, T/cp]) int64, for `apply_rope(..., positions)`."""
    check_seq_len(seq_len, cp, sharding)
    c = seq_len // num_chunks(cp, sharding)
    pos = torch.cat([torch.arange(j * c, (j + 1) * c, device=device) for j in rank_chunks(cp, rank, sharding)])
    return pos if batch is None else pos.unsqueeze(0).expand(batch, -1)


def shard_order(seq_len: int, cp: int, sharding: str, device=None) -> torch.Tensor:
    """Global positions of the sequence laid out rank after rank (what an all-gather of the shards yields)."""
    return torch.cat([sequence_positions(seq_len, cp, r, sharding, device=device) for r in range(cp)])


def unshard_sequence(shards: Sequence[torch.Tensor], sharding: str, dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's shard (rank order), without communication (tests, tools)."""
    cp = len(shards)
    stacked = torch.cat(list(shards), dim=dim)
    order = shard_order(stacked.shape[dim], cp, sharding, device=stacked.device)
    return stacked.index_select(dim, torch.argsort(order))


def gather_sequence(x: torch.Tensor, cg, sharding: str, dim: int = 1) -> torch.Tensor:
    """The whole sequence on every rank of the cp group (an all-gather; evaluation and tests, not per step)."""
    from megaeff.distributed.comm import all_gather

    if cg.size == 1:
        return x
    full = all_gather(x, cg, dim)
    order = shard_order(full.shape[dim], cg.size, sharding, device=x.device)
    return full.index_select(dim, torch.argsort(order))


def chunk_positions(chunks: Sequence[int], chunk_len: int, device=None) -> torch.Tensor:
    return torch.cat([torch.arange(j * chunk_len, (j + 1) * chunk_len, device=device) for j in chunks])


__all__: List[str] = [
    "SHARDINGS",
    "ContextParallelError",
    "check_sharding",
    "num_chunks",
    "rank_chunks",
    "check_seq_len",
    "shard_sequence",
    "sequence_positions",
    "shard_order",
    "unshard_sequence",
    "gather_sequence",
    "chunk_positions",
]
