"""RoPE tables of given positions only (`rope_tables_at`) equal the rows of the whole-sequence tables."""

from __future__ import annotations

import pytest
import torch

from megaeff.layers.rope import apply_rope, rope_tables, rope_tables_at


@pytest.mark.parametrize("head_dim", [4, 6, 128])
def test_tables_at_positions_equal_the_rows_of_the_full_tables(head_dim):
    # Same fp32 product and cos/sin per element as rope_tables, so equality is exact (torch.equal), for
    # contiguous, zigzag-like, unsorted and batched [B, T] positions, and for positions past a short table.
    cos, sin = rope_tables(head_dim, 1000, 500000.0)
    for pos in (
        torch.arange(250, 500),
        torch.cat([torch.arange(125, 250), torch.arange(750, 875)]),
        torch.tensor([999, 3, 0, 512]),
        torch.arange(40).view(2, 20) * 7,
    ):
        c, s = rope_tables_at(pos, head_dim, 500000.0)
        assert c.shape == (*pos.shape, head_dim) and c.dtype == torch.float32
        assert torch.equal(c, cos[pos]) and torch.equal(s, sin[pos])
    x = torch.randn(2, 3, 20, head_dim)
    pos = torch.arange(40).view(2, 20) * 7
    c, s = rope_tables_at(pos, head_dim, 500000.0)
    want = apply_rope(x, cos, sin, pos)
    assert torch.equal(apply_rope(x, c.unsqueeze(1), s.unsqueeze(1)), want)  # [B, 1, T, D] broadcasts over heads
    # A wrong theta or a missing offset does not pass.
    assert not torch.equal(rope_tables_at(pos, head_dim, 10000.0)[1], sin[pos])
    assert not torch.equal(rope_tables_at(pos + 1, head_dim, 500000.0)[0], cos[pos])
