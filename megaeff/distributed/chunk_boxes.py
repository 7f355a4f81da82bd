"""Boxes of logical tensors: which part of each logical tensor a rank's local tensor holds, as (global offsets,
view) pairs. Sharded checkpoints (torch.distributed.checkpoint) describe every rank's shards with them, so each
rank writes only its own bytes and a load reshards onto any layout; the layouts answer through `local_pieces`
(megaeff/distributed/logical_state.py, megaeff/distributed/fssdp/state.py, the distributed experts).

A box is a dense sub-block of the logical tensor: `offsets` (one index per dim) and the sizes of its view.
Every view aliases the local tensor, so a load writes into the views in place.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence, Tuple

import torch

Box = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (offsets, sizes)


class Pieces(NamedTuple):
    """This rank's part of one logical tensor: its shape and the chunks held here, each (offsets in the logical
    tensor, a view of the local tensor whose shape is the box's size). Scalars: shape (), one chunk at ()."""

    logical_shape: Tuple[int, ...]
    chunks: List[Tuple[Tuple[int, ...], torch.Tensor]]


def whole(tensor: torch.Tensor) -> Pieces:
    """A tensor held whole (replicated, or not split): one chunk at the origin."""
    return Pieces(tuple(tensor.shape), [((0,) * tensor.dim(), tensor)])


def placed(logical_shape: Sequence[int], offsets: Sequence[int], view: torch.Tensor) -> Pieces:
    """One box at `offsets`; none when the view is empty (an empty shard holds nothing to write)."""
    logical, offsets = tuple(int(d) for d in logical_shape), tuple(int(o) for o in offsets)
    if len(offsets) != len(logical) or view.dim() != len(logical):
        raise ValueError(f"box at {offsets} of shape {tuple(view.shape)} in a tensor of shape {logical}")
    if any(o < 0 or o + s > d for o, s, d in zip(offsets, view.shape, logical)):
        raise ValueError(f"box at {offsets} of shape {tuple(view.shape)} exceeds the tensor's {logical}")
    return Pieces(logical, [(offsets, view)] if view.numel() else [])


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> List[Box]:
    """The boxes covering elements [start, stop) of the row-major flattening of a tensor of `shape`, in order:
    a partial first row, whole rows, a partial last row, recursively along the dims, so at most
    2 (ndim - 1) + 1 boxes. Every box's sizes are (1, ..., 1, k, full dims...), so each box is contiguous in the
    flattening and the boxes follow each other: the matching slice of a flat vector views as the box."""
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"flat range [{start}, {stop}) outside a tensor of shape {shape}")
    if start == stop:
        return []
    if len(shape) <= 1:
        return [((start,) * len(shape), (stop - start,) * len(shape))]
    row = numel // shape[0]  # elements per index of dim 0
    first, last = start // row, (stop - 1) // row

    def inside(i: int, a: int, b: int) -> List[Box]:  # [a, b) of index i of dim 0
        return [((i, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], a - i * row, b - i * row)]

    if first == last:
        return inside(first, start, stop)
    boxes: List[Box] = []
    if start % row:
        boxes += inside(first, start, (first + 1) * row)
        first += 1
    end = last + 1 if stop % row == 0 else last  # whole rows [first, end)
    if end > first:
        boxes.append(((first, *(0,) * (len(shape) - 1)), (end - first, *shape[1:])))
    if stop % row:
        boxes += inside(last, last * row, stop)
    return boxes


def flat_range_pieces(
    shape: Sequence[int], start: int, stop: int, flat: torch.Tensor
) -> List[Tuple[Tuple[int, ...], torch.Tensor]]:
    """Chunks of elements [start, stop) of a tensor of `shape`, whose values are `flat` (1-D, stop - start
    elements, in order): each box with the view of its slice of `flat`."""
    if flat.dim() != 1 or flat.numel() != stop - start:
        raise ValueError(f"{flat.numel()} values for the flat range [{start}, {stop})")
    out, at = [], 0
    for offsets, sizes in flat_range_boxes(shape, start, stop):
        n = math.prod(sizes)
        out.append((offsets, flat[at : at + n].view(sizes)))
        at += n
    return out
