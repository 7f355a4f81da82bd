"""Logical views of parameters in one process (every tensor its own logical tensor), the global gradient norm
against torch's, and the rule that COAT's FP8 groups must not straddle tensor-parallel shards."""

from __future__ import annotations

import pytest
import torch

from megaeff.config.schema import MethodConfig, ModelConfig
from megaeff.distributed.dims import ParallelDims
from megaeff.distributed.grad_norm import clip_grad_norm_, global_grad_norm, square_sum
from megaeff.distributed.logical_state import LogicalState, annotate_parameters, fp8_group_problem
from megaeff.layers.param_meta import ParamMeta, param_meta, set_param_meta
from megaeff.models.init import materialize
from megaeff.models.llama import build_llama

ONE = ParallelDims(tp=1, cp=1, dp=1, pp=1, world_size=1)


def tiny(method="sltrain"):
    cfg = ModelConfig(dim=32, ffn_dim=64, n_heads=2, n_layers=1, vocab_size=64, max_seq_len=16)
    return materialize(build_llama(cfg, MethodConfig(name=method, rank=4), device="meta"), torch.device("cpu"), 0, 0.02)


def test_single_process_parameters_are_replicated_and_pass_through():
    model = tiny()
    annotate_parameters(model)
    for p in model.parameters():
        assert param_meta(p).tp_split == "replicated" and param_meta(p).logical_shape == tuple(p.shape)
    logical = LogicalState(model)
    assert not logical.sharded
    state = model.state_dict()
    assert all(a is b for a, b in zip(logical.gather_model(state).values(), state.values()))


def test_global_grad_norm_and_clipping_match_torch():
    model = tiny()
    annotate_parameters(model)
    model(torch.randint(0, 64, (2, 16))).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ref = float(torch.nn.utils.get_total_norm(grads))
    assert global_grad_norm(model.parameters(), ONE) == pytest.approx(ref, rel=1e-6)
    norm = clip_grad_norm_(model.parameters(), ref / 4, ONE)
    assert norm == pytest.approx(ref, rel=1e-6)
    clipped = ref * (ref / 4) / (ref + 1e-6)  # torch's coefficient max_norm / (norm + 1e-6)
    assert float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) == pytest.approx(
        clipped, rel=1e-6
    )
    clip_grad_norm_(model.parameters(), float("inf"), ONE)  # no clipping: gradients untouched
    assert float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) == pytest.approx(
        clipped, rel=1e-6
    )


def shard(shape, spec, logical_shape):
    p = torch.nn.Parameter(torch.zeros(shape))
    set_param_meta(p, ParamMeta(tp_split=spec, logical_shape=logical_shape))
    return p


@pytest.mark.parametrize(
    "shape,spec,logical,ok",
    [
        ((64, 256), "rows", (128, 256), True),  # whole rows of whole groups
        ((2, 64), "rows", (4, 64), True),  # 2 rows per group (64 columns), 2 local rows
        ((1, 64), "rows", (2, 64), False),  # a group of 2 rows would be split
        ((32, 128), "cols", (32, 256), True),  # 128-column shards of 128-wide groups
        ((32, 64), "cols", (32, 128), False),  # half a group per shard
        ((32, 32), "cols", (32, 64), False),  # logical groups span 2 rows of 64
        ((100,), "support", (200,), False),  # sparse values split by the support
        ((64, 64), "replicated", (64, 64), True),
    ],
)
def test_fp8_groups_must_not_straddle_shards(shape, spec, logical, ok):
    problem = fp8_group_problem(shard(shape, spec, logical))
    assert (problem == "") == ok, problem


def test_square_sum_in_chunks_is_the_float64_sum_of_squares():
    """Chunked (bounded temporaries) against the whole-tensor float64 sum: identical at or below one chunk;
    above, only the float64 summation order differs (relative error below n * 2^-53 by the usual bound, with n
    the number of partial sums). A chunk that skipped the tail or squared twice would be off by far more."""
    g = torch.randn(10_007, generator=torch.Generator().manual_seed(0))
    whole = g.double().pow(2).sum()
    assert torch.equal(square_sum(g, chunk=10_007), whole)
    for chunk in (1000, 4096):
        got = square_sum(g, chunk=chunk)
        assert abs(float(got) - float(whole)) <= 10_007 * 2.0**-53 * float(whole)
    assert abs(float(square_sum(g[:-7], chunk=1000)) - float(whole)) > 1e-6 * float(whole)  # a lost tail shows
