"""FSSDP's sharding rule and the flat buffers its collectives carry (plan.py applies the rule; engine.py and
grad_sync.py run the collectives).

Sharding rule. Every trainable tensor is cut along dim 0 into *blocks* that hold whole COAT groups of the
tensor (megaeff/precision/group_quant.py: 1 x 128 tiles along the last dim; rows shorter than 128 tiled
128 // C rows per group):

    [R, C], C >= 128       a block is 1 row (a row boundary never splits a group)
    [R, C], C < 128        a block is 128 // C rows (the last block may be short)
    [n], n >= 128          a block is 128 elements (the tensor is one row of n columns)
    [D0, ..., C]           the smallest run of dim-0 indices whose rows fill whole row-groups

The blocks are dealt to the d ranks of the shard group in contiguous, balanced runs (the first `blocks % d`
ranks get one more). A tensor with fewer blocks than d, or whose shard group has one rank, is *replicated*:
every rank keeps it whole and its gradient is all-reduced. Shards of unequal size are padded to the largest for
the collectives (the padding is counted in the bytes, and reported by `padding_numel`).

Because a shard is a run of whole groups, an optimizer that lays out groups from the shard's own shape (CoatAdamW)
gets exactly the logical tensor's groups, and the FP8 metadata of the logical tensor is the concatenation of the
shards' metadata rows in rank order: states reshard exactly.

Flat buffers. One collective carries every tensor of a unit that shares a shard group: slot t of the buffer
holds this rank's shard of tensor t, padded to the largest shard of t; rank q's slots follow rank q-1's. The
gather payload is the shard in fp32, in bf16, or as FP8 E4M3 codes with one fp32 scale per 1 x 128 group of the
shard (absmax / 448), dequantized to fp32 on arrival; the reduce-scatter payload is the gradient in fp32 or bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from megaeff.distributed.comm import CommGroup, all_gather_flat, reduce_scatter_flat
from megaeff.precision.fp8 import get_format
from megaeff.precision.group_quant import GROUP_SIZE, GroupLayout

GATHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.uint8}
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KINDS = ("shard", "hybrid", "replicated")
E4M3 = get_format("e4m3")


def block_size(shape: Sequence[int], group_size: int = GROUP_SIZE) -> int:
    """Dim-0 indices per block: the smallest run whose rows fill whole groups of `shape`'s layout."""
    if len(shape) == 1:
        return group_size
    lay = GroupLayout.for_shape(shape, group_size)
    inner = math.prod(shape[1:-1])  # rows per dim-0 index
    return lay.rows_per_group // math.gcd(lay.rows_per_group, inner)


def dim0_bounds(shape: Sequence[int], degree: int, group_size: int = GROUP_SIZE) -> Optional[List[Tuple[int, int]]]:
    """(start, stop) along dim 0 for each of `degree` ranks, or None when the tensor must stay replicated."""
    if degree <= 1 or len(shape) == 0:
        return None
    block = block_size(shape, group_size)
    n_blocks = -(-int(shape[0]) // block)
    if n_blocks < degree:
        return None
    base, extra = divmod(n_blocks, degree)
    bounds, b = [], 0
    for r in range(degree):
        nb = base + (1 if r < extra else 0)
        bounds.append((min(b * block, shape[0]), min((b + nb) * block, shape[0])))
        b += nb
    return bounds


@dataclass
class TensorShard:
    """How one logical parameter is held under FSSDP.

    `full_shape` is the tensor this layout computes with (the tensor-parallel shard when tp > 1, else the logical
    tensor); `logical_shape` the single-process one. `bounds[q]` is group member q's run of dim 0 and
    `group_counts[q]` its number of FP8 groups (rows of a COAT `*_meta` tensor)."""

    name: str
    kind: str
    full_shape: Tuple[int, ...]
    logical_shape: Tuple[int, ...]
    dtype: torch.dtype
    bounds: List[Tuple[int, int]]
    me: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown FSSDP kind {self.kind!r}")
        self.row_numel = math.prod(self.full_shape[1:])
        self.group_counts = [GroupLayout.for_shape(self.shape_of(q)).n_groups for q in range(len(self.bounds))]
        total = GroupLayout.for_shape(self.full_shape).n_groups
        if sum(self.group_counts) != total:  # the rule above makes this impossible; guard the invariant anyway
            raise AssertionError(f"{self.name}: shards hold {sum(self.group_counts)} FP8 groups, the tensor {total}")

    @property
    def degree(self) -> int:
        return len(self.bounds)

    def shape_of(self, q: int) -> Tuple[int, ...]:
        a, b = self.bounds[q]
        return (b - a, *self.full_shape[1:])

    def numel_of(self, q: int) -> int:
        a, b = self.bounds[q]
        return (b - a) * self.row_numel

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.shape_of(self.me)

    @property
    def max_numel(self) -> int:
        return max(self.numel_of(q) for q in range(self.degree))

    @property
    def max_groups(self) -> int:
        return max(self.group_counts)

    @property
    def full_numel(self) -> int:
        return math.prod(self.full_shape)

    @property
    def padding_numel(self) -> int:
        return self.degree * self.max_numel - self.full_numel

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        a, b = self.bounds[self.me]
        return full[a:b]

    def group_range(self, q: Optional[int] = None) -> Tuple[int, int]:
        q = self.me if q is None else q
        start = sum(self.group_counts[:q])
        return start, start + self.group_counts[q]


# ------------------------------------------------------------------------------------------------ FP8 payload
def fp8_encode(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes shaped like `x` and one fp32 absmax scale per 1 x 128 group of `x`'s own layout."""
    lay = GroupLayout.for_shape(x.shape)
    g = lay.to_groups(x.detach().float())
    amax = g.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3.max, torch.ones_like(amax))
    codes = (g / scale[:, None]).clamp(-E4M3.max, E4M3.max).to(E4M3.dtype)
    return lay.from_groups(codes).reshape(x.shape), scale


def fp8_decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    lay = GroupLayout.for_shape(codes.shape)
    return lay.from_groups(lay.to_groups(codes).float() * scale[:, None]).reshape(codes.shape)


# ------------------------------------------------------------------------------------------------ flat buffers
class FlatGroup:
    """The tensors of one unit that share a shard group, and their packing into one flat buffer per collective."""

    def __init__(self, shards: List[TensorShard], cg: CommGroup, gather_dtype: str, reduce_dtype: str):
        if gather_dtype not in GATHER_DTYPES:
            raise ValueError(f"unknown FSSDP gather dtype {gather_dtype!r}; available: {', '.join(GATHER_DTYPES)}")
        if reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"unknown FSSDP reduce dtype {reduce_dtype!r}; available: {', '.join(REDUCE_DTYPES)}")
        self.shards, self.cg = shards, cg
        self.gather_dtype, self.reduce_dtype = gather_dtype, reduce_dtype
        self.fp8 = gather_dtype == "fp8"
        # Element offsets of each tensor's slot (gather and reduce payloads in fp32/bf16).
        self.offsets, off = [], 0
        for s in shards:
            self.offsets.append(off)
            off += s.max_numel
        self.slot = off
        if self.fp8:
            # Bytes: all scales first (4-byte aligned in every rank's slot), then the codes.
            self.scale_offsets, self.code_offsets, off = [], [], 0
            for s in shards:
                self.scale_offsets.append(off)
                off += 4 * s.max_groups
            for s in shards:
                self.code_offsets.append(off)
                off += s.max_numel
            self.gather_slot = -(-off // 4) * 4
        else:
            self.gather_slot = self.slot

    # ------------------------------------------------------------------ sizes
    @property
    def gather_elem_bytes(self) -> int:
        return torch.empty((), dtype=GATHER_DTYPES[self.gather_dtype]).element_size()

    @property
    def gather_bytes(self) -> int:
        """Bytes one gather of this group records (the gathered payload)."""
        return self.cg.size * self.gather_slot * self.gather_elem_bytes

    @property
    def reduce_bytes(self) -> int:
        return self.cg.size * self.slot * torch.empty((), dtype=REDUCE_DTYPES[self.reduce_dtype]).element_size()

    # ------------------------------------------------------------------ gather
    def pack(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        dev = shards[0].device
        if self.fp8:
            buf = torch.zeros(self.gather_slot, dtype=torch.uint8, device=dev)
            for t, so, co in zip(shards, self.scale_offsets, self.code_offsets):
                codes, scale = fp8_encode(t)
                buf[so : so + 4 * scale.numel()] = scale.view(torch.uint8)
                buf[co : co + t.numel()] = codes.reshape(-1).view(torch.uint8)
            return buf
        dtype = GATHER_DTYPES[self.gather_dtype]
        buf = torch.zeros(self.slot, dtype=dtype, device=dev)
        for t, off in zip(shards, self.offsets):
            buf[off : off + t.numel()] = t.detach().reshape(-1).to(dtype)
        return buf

    def launch_gather(self, shards: Sequence[torch.Tensor], async_op: bool = True):
        """(work or None, receive buffer, send buffer): the gather runs while the caller computes; both buffers
        must stay alive until the work is done."""
        send = self.pack(shards)
        recv = send.new_empty(self.cg.size * send.numel())
        return all_gather_flat(recv, send, self.cg, async_op=async_op), recv, send

    def unpack(self, recv: torch.Tensor) -> List[torch.Tensor]:
        """The full fp32 tensors from a completed gather."""
        rows = recv.view(self.cg.size, self.gather_slot)
        out = []
        for i, s in enumerate(self.shards):
            pieces = []
            for q in range(s.degree):
                n = s.numel_of(q)
                if self.fp8:
                    so, co, g = self.scale_offsets[i], self.code_offsets[i], s.group_counts[q]
                    scale = rows[q, so : so + 4 * g].clone().view(torch.float32)
                    codes = rows[q, co : co + n].clone().view(E4M3.dtype).view(s.shape_of(q))
                    pieces.append(fp8_decode(codes, scale))
                else:
                    off = self.offsets[i]
                    pieces.append(rows[q, off : off + n].view(s.shape_of(q)))
            full = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0].clone()
            out.append(full.to(s.dtype))
        return out

    # ------------------------------------------------------------------ reduce-scatter
    def launch_reduce(self, grads: Sequence[Optional[torch.Tensor]], async_op: bool = True):
        """(work or None, output slot, send buffer): the summed gradient slot of this rank, once the work is done.
        A missing gradient counts as zeros (every rank must send the same collective)."""
        dtype = REDUCE_DTYPES[self.reduce_dtype]
        p = self.cg.size
        dev = next((g.device for g in grads if g is not None), torch.device("cpu"))
        send = torch.zeros(p, self.slot, dtype=dtype, device=dev)
        for s, g, off in zip(self.shards, grads, self.offsets):
            if g is None:
                continue
            for q in range(s.degree):
                a, b = s.bounds[q]
                send[q, off : off + s.numel_of(q)] = g[a:b].reshape(-1).to(dtype)
        out = send.new_empty(self.slot)
        return reduce_scatter_flat(out, send.view(-1), self.cg, async_op=async_op), out, send

    def shard_grads(self, out: torch.Tensor) -> List[torch.Tensor]:
        return [
            out[off : off + s.numel_of(s.me)].view(s.shape).to(s.dtype) for s, off in zip(self.shards, self.offsets)
        ]
