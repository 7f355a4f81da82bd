"""Boxes of a flat range of a row-major tensor (megaeff/distributed/chunk_boxes.py): exhaustive over small
shapes, every box lies inside the tensor, the boxes cover exactly the range once, in order, at most
2 (ndim - 1) + 1 of them, and the slices of a flat vector view as the boxes, aliasing it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megaeff.distributed.chunk_boxes import flat_range_boxes, flat_range_pieces, placed, whole

SHAPES = [(7,), (3, 5), (4, 1), (1, 6), (2, 3, 4), (3, 2, 1, 5)]


def covered(shape, boxes):
    """Element count per position of a tensor of `shape` covered by `boxes`."""
    count = torch.zeros(shape, dtype=torch.int64)
    for offsets, sizes in boxes:
        assert all(o >= 0 and o + s <= d and s > 0 for o, s, d in zip(offsets, sizes, shape)), (offsets, sizes)
        count[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] += 1
    return count


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_flat_range_is_covered_exactly_once_in_order(shape):
    numel = math.prod(shape)
    for start, stop in itertools.combinations_with_replacement(range(numel + 1), 2):
        boxes = flat_range_boxes(shape, start, stop)
        want = torch.zeros(numel, dtype=torch.int64)
        want[start:stop] = 1
        assert torch.equal(covered(shape, boxes).reshape(-1), want), (start, stop, boxes)
        assert len(boxes) <= 2 * (len(shape) - 1) + 1
        # In order, each contiguous in the flattening: box k starts where box k - 1 ended.
        at = start
        for offsets, sizes in boxes:
            k = next((i for i, s in enumerate(sizes) if s != 1), len(sizes) - 1)
            assert tuple(sizes[k + 1 :]) == tuple(shape[k + 1 :])  # (1, ..., 1, k, whole dims): contiguous
            first = sum(o * math.prod(shape[i + 1 :]) for i, o in enumerate(offsets))
            assert first == at
            at += math.prod(sizes)
        assert at == stop


def test_pieces_view_the_flat_vector_in_place():
    shape, start, stop = (3, 4, 5), 7, 53
    logical = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
    flat = logical.reshape(-1)[start:stop].clone()
    pieces = flat_range_pieces(shape, start, stop, flat)
    assert len(pieces) == 5  # partial row, rest of a slab, one whole slab, a slab's rows, a partial row
    rebuilt = torch.full(shape, -1.0)
    for offsets, view in pieces:
        assert view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        rebuilt[tuple(slice(o, o + s) for o, s in zip(offsets, view.shape))] = view
    assert torch.equal(rebuilt.reshape(-1)[start:stop], logical.reshape(-1)[start:stop])
    assert (rebuilt.reshape(-1)[:start] == -1).all() and (rebuilt.reshape(-1)[stop:] == -1).all()
    pieces[0][1].fill_(-7.0)  # a write into a view lands in the flat vector
    assert (flat[: pieces[0][1].numel()] == -7.0).all()


def test_bad_ranges_and_boxes_are_refused():
    with pytest.raises(ValueError, match="outside"):
        flat_range_boxes((2, 3), 4, 7)
    with pytest.raises(ValueError, match="values for the flat range"):
        flat_range_pieces((2, 3), 0, 4, torch.zeros(3))
    with pytest.raises(ValueError, match="exceeds"):
        placed((4, 3), (3, 0), torch.zeros(2, 3))
    assert placed((4, 3), (4, 0), torch.zeros(0, 3)).chunks == []  # an empty shard has no chunk
    assert flat_range_boxes((), 0, 1) == [((), ())]
    assert whole(torch.zeros(())).chunks[0][0] == ()
