"""Gradient clipping by the global norm of the logical gradient, whatever the layout.

A sharded parameter's (`tp_split` rows | cols | support in its `ParamMeta`, megaeff/layers/param_meta.py) squared
norm is a partial sum over the tp group; a replicated one is complete and identical on every tp rank, so it is
counted once. Pipeline stages hold disjoint parameters, so their totals add up over pp. Data-parallel replicas
hold identical (already reduced) gradients and are not summed; under FSSDP (`dp_sharded`) every rank holds a
different part of each gradient, so the squares are summed over dp x cp, each weighted by 1 / `dp_replicas` (the
dp x cp ranks holding the same values: 1 for a shard, more for a replicated norm). The squares accumulate in
float64 so that the norm does not depend on how the layout splits the sum. A weight under gradient-accumulation
fusion is read and clipped in its fp32 `main_grad` (`grad_of`, megaeff/layers/grad_accum_fusion.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from megaeff.distributed.comm import all_reduce
from megaeff.distributed.logical_state import SHARDED
from megaeff.layers.grad_accum_fusion import grad_of
from megaeff.layers.param_meta import param_meta

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims


# Elements squared per pass: a float64 copy of a whole gradient would cost 8 bytes per element (1 GB for
# LLaMA-7B's embedding) on top of the step's peak.
SQUARE_CHUNK = 1 << 20


def square_sum(t: torch.Tensor, chunk: int = SQUARE_CHUNK) -> torch.Tensor:
    """The sum of squares of `t` in float64 (a 0-d tensor on its device), `chunk` elements at a time."""
    flat = t.detach().reshape(-1)
    if flat.numel() <= chunk:
        return flat.double().pow(2).sum()
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for lo in range(0, flat.numel(), chunk):
        total += flat[lo : lo + chunk].double().pow(2).sum()
    return total


class GradSquares:
    """The global norm of the gradients, added parameter by parameter (the optimizer in backward adds each as it
    is final): tp-sharded squares summed over tp, replicated ones counted once, dp x cp spread ones (FSSDP
    shards, expert shards) weighted by 1 / dp_replicas and summed over dp x cp, stages summed over pp; float64."""

    def __init__(self, params: Sequence[torch.Tensor], dims: ParallelDims, *, dp_sharded: bool):
        self.dims, self.dp_sharded = dims, dp_sharded
        # Decided from the parameters, never from values: every rank must agree to reduce.
        self.has_spread = dp_sharded or any(param_meta(p).expert for p in params)
        self.reset()

    def reset(self) -> None:
        self.local = torch.zeros(2, dtype=torch.float64)  # [tp-sharded, tp-replicated]
        self.spread = torch.zeros(2, dtype=torch.float64)

    def add(self, p: torch.Tensor, sq: torch.Tensor) -> None:
        meta = param_meta(p)
        on_dp = self.dp_sharded or meta.expert
        acc = self.spread if on_dp else self.local
        acc[0 if meta.tp_split in SHARDED else 1] += sq / meta.dp_replicas if on_dp else sq

    def total(self) -> float:
        """The global norm (a collective over dp x cp, tp and pp)."""
        dims, spread = self.dims, self.spread
        if self.has_spread and dims.size("dp_cp") > 1:
            spread = all_reduce(spread.to(dims.device), dims.comm("dp_cp")).cpu()
        sharded, replicated = self.local[0] + spread[0], self.local[1] + spread[1]
        if dims.tp > 1:
            sharded = all_reduce(sharded.to(dims.device), dims.comm("tp")).cpu()
        total = sharded + replicated
        if dims.pp > 1:
            total = all_reduce(total.to(dims.device), dims.comm("pp")).cpu()
        return float(total.sqrt())


def global_grad_norm(params: Iterable[torch.Tensor], dims: ParallelDims, *, dp_sharded: bool = False) -> float:
    params = list(params)
    squares = GradSquares(params, dims, dp_sharded=dp_sharded)
    for p in params:
        g = grad_of(p)
        if g is not None:
            squares.add(p, square_sum(g).cpu())
    return squares.total()


def clip_grad_norm_(params, max_norm: float, dims: ParallelDims, *, dp_sharded: bool = False) -> float:
    """Scale gradients so that the global norm is at most `max_norm` (torch's rule: coefficient
    max_norm / (norm + 1e-6), clamped to 1); returns the norm before clipping."""
    params = [p for p in params if grad_of(p) is not None]
    norm = global_grad_norm(params, dims, dp_sharded=dp_sharded)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in params:
            grad_of(p).detach().mul_(coef)
    return norm
