"""The common machinery of the tensor-parallel linear layers, and the dense (Megatron) pair.

A TP layer is built from a single-process layer of megaeff/layers (`from_logical`) or re-initialized from the
seed (`init_weights`, which builds the logical layer on the CPU, runs its layout-independent init and keeps this
rank's shard), so concatenating the shards always gives exactly the single-process tensors. Each class declares
how every parameter is split (`SPLITS[name][style]`):

    rows        the logical tensor's dim 0 is split in tp equal blocks, rank i keeps block i
    cols        the same along dim 1
    replicated  every tp rank holds the whole tensor (kept identical: its gradient is complete on every rank,
                or all-reduced over tp in backward by `copy_to_region` where it is a partial sum)
    support     (SLTrain's sparse values) the entries whose logical position falls in this rank's rows / cols

Each parameter carries that word and its logical shape in its record (`ParamMeta`, megaeff/layers/param_meta.py)
so later wiring (gradient norm, checkpoints, optimizers) can tell sharded from replicated tensors. Layers compute
through the logical layer's `ops` (megaeff/layers/ops.py), so an activation policy such as FP8 activations
applies unchanged.

Conventions of the region boundaries (Megatron's): a column-parallel layer takes a replicated input (or, with
sequence parallelism, the sequence shard) and returns its output features' shard; the gradient it hands back for
its input is complete (or the complete sequence shard). A row-parallel layer takes its input features' shard
and returns the replicated output (or the output's sequence shard).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
from torch import nn

from megaeff.distributed.comm import CommGroup, all_gather
from megaeff.distributed.tensor_parallel.mappings import (
    copy_to_region,
    gather_last,
    gather_seq,
    reduce_from_region,
    reduce_scatter_seq,
)
from megaeff.layers.grad_accum_fusion import dense_wgrad_accum, grad_of
from megaeff.layers.ops import resolve
from megaeff.layers.param_meta import ParamMeta, set_param_meta

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims

STYLES = ("column", "row")

# The logical constructor's hyperparameters per method (attribute names of the single-process layer).
LOGICAL_ARGS = {
    "dense": (),
    "lowrank": ("rank",),
    "sltrain": ("rank", "alpha", "density", "path"),
    "lost": ("rank", "channel_ratio", "gamma", "act", "complement_rank", "sparse_init"),
}


class TPLinear(nn.Module):
    method = ""
    SPLITS: Dict[str, Dict[str, str]] = {}
    # Whether the column form's region entry is the layer input itself (dense, SLTrain) rather than a compact
    # intermediate (lowrank, LOST). Layers of the first kind that read one input (q, k, v) can share one
    # sequence-parallel all-gather done by the caller (`input_gathered`, set by parallelize).
    gathers_input = False

    def __init__(
        self,
        logical: nn.Module,
        dims: ParallelDims,
        style: str,
        *,
        sequence_parallel: bool = False,
        gather_output: bool = False,
        seq_dim: int = 1,
    ):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"unknown tensor-parallel style {style!r}; available: {', '.join(STYLES)}")
        if gather_output and style != "column":
            raise ValueError("gather_output applies to column-parallel layers only")
        self.cg: CommGroup = dims.comm("tp")
        self.style, self.sequence_parallel, self.gather_output, self.seq_dim = (
            style,
            bool(sequence_parallel),
            gather_output,
            seq_dim,
        )
        self.input_gathered = False
        self.in_features, self.out_features = logical.in_features, logical.out_features
        self.name = getattr(logical, "name", None)
        self.ops = resolve(getattr(logical, "ops", None))
        self._logical_cls = type(logical)
        self._logical_kwargs = {k: getattr(logical, k) for k in LOGICAL_ARGS[self.method]}
        p = self.cg.size
        split, size = ("out_features", self.out_features) if style == "column" else ("in_features", self.in_features)
        if size % p:
            raise ValueError(
                f"tensor parallelism: layer {self.name or '?'} ({self.method}, {style}-parallel) needs {split}={size} "
                f"divisible by tp={p}"
            )
        self.local_in = self.in_features // p if style == "row" else self.in_features
        self.local_out = self.out_features // p if style == "column" else self.out_features

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_logical(cls, logical: nn.Module, dims: ParallelDims, style: str, **kw) -> "TPLinear":
        """This rank's shard of a single-process layer (any device; the shard lands where the layer is)."""
        layer = cls(logical, dims, style, **kw)
        layer.load_logical(logical)
        return layer

    def build_logical(self) -> nn.Module:
        """A fresh single-process layer with the same hyperparameters (CPU, fp32), for `init_weights`."""
        return self._logical_cls(
            self.in_features, self.out_features, name=self.name, ops=self.ops, **self._logical_kwargs
        )

    def init_weights(self, prefix: str, init) -> None:
        """Layout-independent init: run the logical layer's own init, keep this rank's shard. The whole logical
        layer exists transiently on the CPU (the seeded streams are sequential, so a shard cannot be drawn alone)."""
        logical = self.build_logical()
        logical.init_weights(prefix, init)
        self.load_logical(logical)

    def shard(self, name: str, tensor: torch.Tensor, logical: nn.Module) -> torch.Tensor:
        spec = self.SPLITS[name][self.style]
        p, r = self.cg.size, self.cg.rank
        if spec == "replicated":
            return tensor
        if spec == "rows":
            return tensor.chunk(p, 0)[r]
        if spec == "cols":
            return tensor.chunk(p, 1)[r]
        raise ValueError(f"{type(self).__name__}: no rule to shard {name} ({spec}); the subclass that declares it must")

    def load_logical(self, logical: nn.Module) -> None:
        """Take this rank's shard of every parameter (and derived buffers) of `logical`."""
        for name in self.SPLITS:
            source = getattr(logical, name).detach()
            value = self.shard(name, source, logical).clone()
            self._set_param(name, value)
        self._load_buffers(logical)
        for name in self.SPLITS:  # after the buffers: SLTrain's logical size comes with its support
            meta = ParamMeta(tp_split=self.split_of(name), logical_shape=tuple(self.logical_shape(name)))
            set_param_meta(getattr(self, name), meta)

    def _set_param(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name, None)
        if isinstance(current, nn.Parameter) and current.shape == value.shape and not current.is_meta:
            with torch.no_grad():
                current.copy_(value)
        else:  # first load, or a data-dependent size (SLTrain's support shard)
            if isinstance(current, nn.Parameter) and not current.is_meta:
                value = value.to(device=current.device, dtype=current.dtype)
            setattr(self, name, nn.Parameter(value.contiguous()))

    def _load_buffers(self, logical: nn.Module) -> None:
        """Derived buffers of this rank's shard (SLTrain's local support, LOST's channel masks); none for dense
        and lowrank."""

    # ------------------------------------------------------------------ logical views (tests, export)
    def gather(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        spec = self.SPLITS[name][self.style]
        if spec == "replicated":
            return tensor
        return all_gather(tensor, self.cg, 0 if spec == "rows" else 1)

    def split_of(self, name: str) -> str:
        return self.SPLITS[name][self.style]

    def shard_logical(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a tensor shaped like the logical parameter `name` (its value, or optimizer state
        of the same shape), for checkpoint loads."""
        return self.shard(name, tensor, None)

    def shard_offset(self, name: str) -> Tuple[int, ...]:
        """Where this rank's slice of `name` starts in the logical tensor (one index per dim; zeros when
        replicated), for checkpoints (megaeff/distributed/logical_state.py, `local_pieces`). A rows split is
        always the output features (column style) and a cols split the input features (row style), divided
        evenly (checked in __init__), so `shard`'s `chunk(p, dim)[rank]` starts at rank * local_out (local_in).
        Read from the layer's widths, not from the parameter, which FSSDP may have replaced by its own shard.
        A split with no box form (SLTrain's row-parallel support) raises ValueError."""
        spec = self.split_of(name)
        offset = [0] * getattr(self, name).dim()
        if spec == "rows":
            offset[0] = self.cg.rank * self.local_out
        elif spec == "cols":
            offset[1] = self.cg.rank * self.local_in
        elif spec != "replicated":
            raise ValueError(f"{type(self).__name__}: {name} is split by {spec}, which has no offset")
        return tuple(offset)

    def logical_shape(self, name: str) -> torch.Size:
        local = getattr(self, name).shape
        spec = self.split_of(name)
        if spec == "rows":
            return torch.Size((local[0] * self.cg.size, *local[1:]))
        if spec == "cols":
            return torch.Size((local[0], local[1] * self.cg.size, *local[2:]))
        return local

    def logical_params(self) -> Dict[str, torch.Tensor]:
        """Every parameter in its logical shape (a collective over tp)."""
        return {n: self.gather(n, getattr(self, n).detach()) for n in self.SPLITS}

    def logical_grads(self) -> Dict[str, Optional[torch.Tensor]]:
        """Every gradient in its logical shape (a collective over tp); replicated ones as held by this rank."""
        out = {}
        for n in self.SPLITS:
            g = grad_of(getattr(self, n))  # a fused weight's fp32 main_grad (grad_accum_fusion)
            out[n] = None if g is None else self.gather(n, g)
        return out

    # ------------------------------------------------------------------ region boundaries
    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Column input: the sequence shards gathered (SP), or the replicated input whose gradient is summed; as it
        is when the caller already gathered it (its gather's backward reduce-scatters the summed gradient)."""
        if self.input_gathered:
            return x
        return gather_seq(x, self.cg, self.seq_dim) if self.sequence_parallel else copy_to_region(x, self.cg)

    def leave(self, y: torch.Tensor) -> torch.Tensor:
        """Row output: partial sums reduced, into sequence shards (SP) or replicated."""
        return (
            reduce_scatter_seq(y, self.cg, self.seq_dim) if self.sequence_parallel else reduce_from_region(y, self.cg)
        )

    def shared(self, param: torch.Tensor) -> torch.Tensor:
        """A replicated parameter whose per-rank gradient is a partial sum (it meets sharded data): all-reduced
        over tp in backward."""
        return copy_to_region(param, self.cg)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return gather_last(y, self.cg) if self.gather_output else y

    def extra_repr(self) -> str:
        return (
            f"{self.method}, {self.style}-parallel, in={self.in_features}, out={self.out_features}, "
            f"tp={self.cg.size}, sequence_parallel={self.sequence_parallel}"
        )


class DenseTP(TPLinear):
    """Megatron's pair. column: W's rows sharded, input replicated (copy_to_region) or all-gathered (SP).
    row: W's columns sharded, output all-reduced or reduce-scattered (SP).

    `fuse_wgrad` (gradient-accumulation fusion, set by megaeff/layers/grad_accum_fusion.py `enable`): the local
    GEMM goes through the fused Function, as in Megatron's tensor-parallel linears. The shard's weight gradient
    is complete on its rank in both styles, so its fp32 `main_grad` needs no tp collective: column, dW_i =
    dy_i^T x with x the whole (replicated or gathered) input and dy_i this rank's output features; row,
    dW_i = dy^T x_i with dy the whole output gradient (the all-reduce's backward is the identity, the
    reduce-scatter's an all-gather) and x_i this rank's input features."""

    method = "dense"
    SPLITS = {"weight": {"column": "rows", "row": "cols"}}
    gathers_input = True
    fuse_wgrad = False

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        return dense_wgrad_accum(x, self.weight) if self.fuse_wgrad else self.ops.dense(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "column":
            return self.finish(self._gemm(self.enter(x)))
        return self.leave(self._gemm(x))
