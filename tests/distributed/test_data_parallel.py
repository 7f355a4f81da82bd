"""GradReducer (megaeff/distributed/data_parallel/bucketed.py) on 4 gloo ranks: bucketed, overlapped gradient
sums over dp_cp.

Every rank builds the same float64 model from the seed, runs its slice of a global batch in micro-batches with the
reducer, and also computes the single-process reference (the whole batch, or the sum over the dp shards) in
process; the tests compare on this side: gradients to 1e-12, buckets launched from hooks, bytes recorded.
"""

from __future__ import annotations

import pytest
import torch

from megaeff.distributed.data_parallel.bucketed import GradReducer
from megaeff.distributed.dims import ParallelDims
from tests.distributed.harness import pool_fixture

pytestmark = pytest.mark.slow

pool = pool_fixture(4)

D_IN, D_H, D_OUT = 8, 16, 4
ROWS = 4  # tokens per micro-batch per dp rank
ACCUM = 2
TOL = dict(rtol=0, atol=1e-12)


def tol(name):
    return dict(rtol=1e-5, atol=1e-6) if name == "scale" else TOL  # `scale` is float32


class MLP(torch.nn.Module):
    """fc2 is applied twice (a tied weight); `extra` only runs when asked (an unused branch); `scale` is float32."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(D_IN, D_H, dtype=torch.float64)
        self.fc2 = torch.nn.Linear(D_H, D_H, dtype=torch.float64)
        self.tied = self.fc2  # the same module under two names
        self.extra = torch.nn.Linear(D_H, D_H, dtype=torch.float64)
        self.frozen = torch.nn.Parameter(torch.ones(D_H, dtype=torch.float64), requires_grad=False)
        self.scale = torch.nn.Parameter(torch.full((D_H,), 1.5, dtype=torch.float32))
        self.out = torch.nn.Linear(D_H, D_OUT, dtype=torch.float64)

    def forward(self, x, use_extra=False, use_scale=False):
        h = torch.tanh(self.fc1(x)) * self.frozen
        h = torch.tanh(self.fc2(h))
        if use_extra:
            h = torch.tanh(self.extra(h))
        h = torch.tanh(self.tied(h))
        if use_scale:
            h = h * self.scale.double()
        return self.out(h)


def data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, dtype=torch.float64, generator=g), torch.randn(
        n, D_OUT, dtype=torch.float64, generator=g
    )


def loss_sum(model, x, y, **kw):
    return 0.5 * ((model(x, **kw) - y) ** 2).sum()


def grads(model):
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def reduced_step(dims, model, reducer, x, y, global_tokens, **kw):
    """One step: ACCUM micro-batches of this rank's rows, one reduction; grads and the bytes recorded."""
    dims.comm_stats.reset()
    for p in model.parameters():
        p.grad = None
    for i, (xm, ym) in enumerate(zip(x.chunk(ACCUM), y.chunk(ACCUM))):
        reducer.prepare(final=i == ACCUM - 1)
        (loss_sum(model, xm, ym, **kw) / global_tokens).backward()
    reducer.finish()
    return grads(model), dims.comm_stats.snapshot()


def reference(shards, **kw):
    """The single-process gradient of sum(loss over every shard) / total tokens."""
    model = MLP()
    tokens = sum(len(x) for x, _ in shards)
    for x, y in shards:
        (loss_sum(model, x, y, **kw) / tokens).backward()
    return grads(model)


# ----------------------------------------------------------------------------- rank functions
def _dp_equivalence(dims, cfg):
    bucket_mb, overlap = cfg
    n = dims.dp * ACCUM * ROWS
    x, y = data(1, n)
    mine = slice(dims.dp_rank * ACCUM * ROWS, (dims.dp_rank + 1) * ACCUM * ROWS)
    model = MLP()
    reducer = GradReducer(
        list(model.named_parameters(remove_duplicate=False)), dims, bucket_mb=bucket_mb, overlap=overlap
    )
    kw = dict(use_extra=True, use_scale=True)  # every parameter gets a gradient
    steps = []
    for _ in range(2):  # the second step reattaches the views after zero_grad(set_to_none=True)
        g, stats = reduced_step(dims, model, reducer, x[mine], y[mine], n, **kw)
        steps.append((g, stats, reducer.launched_in_backward))
    buffers = {b.buffer.untyped_storage().data_ptr() for b in reducer.buckets}
    views = all(p.grad.untyped_storage().data_ptr() in buffers for p in model.parameters() if p.requires_grad)
    info = dict(buckets=reducer.num_buckets, names=reducer.bucket_names, total=reducer.total_bytes, views=views)
    # The final micro-batch runs one backward: a second one into buckets already in flight is refused.
    if overlap:
        for p in model.parameters():
            p.grad = None
        reducer.prepare(final=True)
        loss_sum(model, x[mine], y[mine], **kw).backward()
        try:
            loss_sum(model, x[mine], y[mine], **kw).backward()
            info["double"] = None
        except RuntimeError as e:
            info["double"] = str(e)
        reducer.finish()
    reducer.remove()
    return steps, info, reference([(x, y)], **kw)


def _dp_with_tp(dims, _):
    # Data differ along tp on purpose: the tp peers must not be mixed.
    shard = lambda t, d: data(100 + 10 * t + d, ACCUM * ROWS)  # noqa: E731
    model = MLP()
    reducer = GradReducer(list(model.named_parameters()), dims, bucket_mb=0.0005)
    x, y = shard(dims.tp_rank, dims.dp_rank)
    g, stats = reduced_step(dims, model, reducer, x, y, dims.dp * ACCUM * ROWS)
    return g, stats, reducer.total_bytes, reference([shard(dims.tp_rank, d) for d in range(dims.dp)])


def _unused_branch(dims, overlap):
    # `extra` runs on ranks 0 and 1 only, `scale` on rank 2 only; unused params sit between used buckets.
    n = dims.dp * ACCUM * ROWS
    x, y = data(7, n)
    shards = [
        (x[r * ACCUM * ROWS : (r + 1) * ACCUM * ROWS], y[r * ACCUM * ROWS : (r + 1) * ACCUM * ROWS])
        for r in range(dims.dp)
    ]
    kw = lambda r: dict(use_extra=r < 2, use_scale=r == 2)  # noqa: E731
    model = MLP()
    reducer = GradReducer(list(model.named_parameters()), dims, bucket_mb=0, overlap=overlap)
    g, stats = reduced_step(dims, model, reducer, *shards[dims.rank], n, **kw(dims.rank))
    ref = MLP()
    for r, (xs, ys) in enumerate(shards):
        (loss_sum(ref, xs, ys, **kw(r)) / n).backward()
    return g, stats, reducer.total_bytes, reducer.launched_in_backward, reducer.num_buckets, grads(ref)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("overlap", [True, False])
def test_reduced_grads_equal_single_process(pool, overlap):
    res = pool.run(_dp_equivalence, (0.0005, overlap), layout=dict(dp=4))
    for rank, (steps, info, ref) in enumerate(res):
        assert info["buckets"] >= 3 and info["views"]
        flat = [n for b in info["names"] for n in b]
        # Reverse registration order (the module's own `scale` registers first), tied fc2 once, frozen skipped,
        # float32 `scale` in a bucket of its own.
        assert flat == [
            "out.bias",
            "out.weight",
            "extra.bias",
            "extra.weight",
            "fc2.bias",
            "fc2.weight",
            "fc1.bias",
            "fc1.weight",
            "scale",
        ]
        assert ["scale"] in info["names"]
        for g, stats, from_hooks in steps:
            assert g.keys() == ref.keys()
            for name in ref:
                torch.testing.assert_close(g[name], ref[name], **tol(name), msg=f"rank {rank} {name}")
            assert stats == {"dp_cp/all_reduce": info["total"]}  # every bucket once per step, not per micro-batch
            assert from_hooks == (info["buckets"] if overlap else 0)  # all overlapped with backward
        if overlap:
            assert "accumulated after its bucket was reduced" in info["double"]


def test_dp_with_tp_reduces_over_dp_only(pool):
    res = pool.run(_dp_with_tp, None, layout=dict(tp=2, dp=2))
    for rank, (g, stats, total, ref) in enumerate(res):
        for name in ref:
            torch.testing.assert_close(g[name], ref[name], **TOL, msg=f"rank {rank} {name}")
        assert stats == {"dp_cp/all_reduce": total}
    assert not torch.allclose(res[0][0]["fc1.weight"], res[1][0]["fc1.weight"])  # tp peers stay apart
    torch.testing.assert_close(res[0][0]["fc1.weight"], res[2][0]["fc1.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("overlap", [True, False])
def test_param_without_grad_on_some_ranks(pool, overlap):
    res = pool.run(_unused_branch, overlap, layout=dict(dp=4), timeout=60)
    for rank, (g, stats, total, from_hooks, buckets, ref) in enumerate(res):
        for name in ref:
            torch.testing.assert_close(g[name], ref[name], **tol(name), msg=f"rank {rank} {name}")
        assert stats == {"dp_cp/all_reduce": total}
        assert buckets == 9 and from_hooks <= buckets
        assert (from_hooks >= 2) if overlap else from_hooks == 0  # out.bias, out.weight are always ready first
    assert ref["extra.weight"].abs().sum() > 0 and ref["scale"].abs().sum() > 0


def test_group_of_one_is_a_no_op():
    dims = ParallelDims(tp=1, cp=1, dp=1, pp=1, world_size=1)
    model = MLP()
    reducer = GradReducer(list(model.named_parameters()), dims, bucket_mb=0)
    assert not reducer.enabled and reducer.num_buckets == 0 and reducer._hooks == [] and "no-op" in reducer.describe()
    x, y = data(3, 8)
    for i, (xm, ym) in enumerate(zip(x.chunk(2), y.chunk(2))):
        reducer.prepare(final=i == 1)
        (loss_sum(model, xm, ym) / 8).backward()
    reducer.finish()
    assert dims.comm_stats.snapshot() == {} and reducer.launched_in_backward == 0
    ref = reference([(x, y)])
    for name, g in grads(model).items():
        torch.testing.assert_close(g, ref[name], **TOL)
    reducer.remove()


def test_bad_bucket_size():
    with pytest.raises(ValueError, match="bucket_mb"):
        GradReducer([], ParallelDims(tp=1, cp=1, dp=1, pp=1, world_size=1), bucket_mb=-1)
