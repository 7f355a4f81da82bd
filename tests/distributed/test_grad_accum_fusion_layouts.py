"""Gradient-accumulation fusion (`precision.grad_accum_fusion`, bf16 weights) on tensor-parallel (with sequence
parallelism), pipeline (1F1B) and context-parallel (ring) layouts of 2 gloo ranks, and pp2 x dp2 on 4: each
follows the single-process run with fusion on, and a wrong variant of the main_grad wiring does not.

What each layout relies on. tp: the column/row-parallel dense shards (`DenseTP`) run the fused Function on their
local GEMM, whose weight gradient is the complete gradient of the shard (no tp collective), and the gradient norm
sums their sharded main_grads over tp; the head and the sequence-parallel norms keep autograd's .grad. pp: each
stage's weights get their main_grad from that stage's backwards, zeroed by the optimizer's zero_grad, and the norm
sums over pp; with dp the reducer's main_grad hooks fire from each stage's backwards (pp2 x dp2). cp: the reducer
sums the main_grads over dp x cp as it does over dp. Before this, pp with bf16 weights sent bf16 activations
into float32 receive buffers (NaN losses at step 1); megaeff/distributed/pipeline/runner.py now widens them.

Bound. The layouts compute the same products in other orders and roundings: tp splits the GEMMs' sums and
reduces partial outputs in bf16, pp passes activations between stages in fp32 (the single process keeps a bf16
residual), cp splits attention's softmax sums. Each such difference is a bf16 rounding of an activation, 2^-9
relative, which the loss (a mean over 4 x 32 x 4 tokens) averages rather than adds; the first step's loss (no update
yet) and the later ones are therefore within one bf16 rounding of the loss, 2^-8 relative, of the single run
(the same bound as tests/distributed/test_grad_accum_fusion_dp.py, measured below it by the printed values).
The gradient norm is compared at 2^-6 (the bf16 .grad of norms, embedding and head sums other roundings).
Wrong variants (fused weights never stepped; their main_grad left out of the dp x cp reduction) leave these bounds
(asserted: the losses, resp. the gradient norm), so the bounds tell them apart.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.distributed.harness import pool_fixture
from tests.helpers import compose, records

pytestmark = pytest.mark.slow
pool = pool_fixture(2)
pool4 = pool_fixture(4)  # pp2 x dp2 only: the reducer's main_grad hooks under a pipeline schedule

STEPS = 4
COMMON = [
    "experiment=smoke",
    "precision=bf16",
    "precision.param_dtype=bf16",
    "precision.grad_accum_fusion=true",
    f"train.steps={STEPS}",
    "train.grad_accum=4",
    "train.eval_interval=0",
    "train.ckpt_interval=0",
    "train.plot=false",
    "train.log_interval=1",
    "optim.lr=1e-2",  # larger steps than smoke's, so that a weight left unstepped shows within 4 steps
]
LAYOUTS = {
    "tp2_sp": (["parallel.tp=2", "parallel.sequence_parallel=true"], dict(tp=2)),
    "pp2_1f1b": (["parallel.pp=2", "parallel.pp_schedule=1f1b"], dict(pp=2)),
    "cp2_ring": (["parallel.cp=2", "parallel.cp_impl=ring"], dict(cp=2)),
    # The same global batch, 16 sequences: micro 4 x dp 2 x accum 2 (COMMON's accum 4 is overridden).
    "pp2_dp2": (["parallel.pp=2", "parallel.dp=2", "train.grad_accum=2"], dict(pp=2, dp=2)),
}


def _unstepped():
    """Wrong: the per-parameter optimizer does not see the fused weights' main_grad (they never move)."""
    from megaeff.optim import per_param

    real = per_param.is_fused
    per_param.is_fused = lambda p: False
    return lambda: setattr(per_param, "is_fused", real)


def _unreduced():
    """Wrong: the fused weights' main_grad is left out of the dp x cp reduction (each rank steps its own)."""
    from megaeff.distributed import parallelize
    from megaeff.layers.grad_accum_fusion import is_fused

    real = parallelize.GradReducer

    def unfused(params, dims, **kw):
        return real([(n, p) for n, p in params if not is_fused(p)], dims, **kw)

    parallelize.GradReducer = unfused
    return lambda: setattr(parallelize, "GradReducer", real)


WRONG = {"unstepped": _unstepped, "unreduced": _unreduced}


def _fit(dims, overrides, run_dir, wrong=None):
    """tests/helpers.py `fit_on_rank` with an optional wrong variant patched in (undone after: the pool's ranks
    are reused); returns which parameters this rank trains with a fused main_grad."""
    from megaeff.layers.grad_accum_fusion import is_fused
    from megaeff.train.trainer import Trainer

    undo = WRONG[wrong]() if wrong else (lambda: None)
    try:
        trainer = Trainer(compose([*overrides, f"run_dir={run_dir}"]), dims, Path(run_dir))
        try:
            trainer.fit()
            return sorted(n for n, p in trainer.model.named_parameters() if is_fused(p))
        finally:
            trainer.close()
    finally:
        undo()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from megaeff.distributed.dims import ParallelDims

    run = Path(tempfile.mkdtemp(dir=tmp_path_factory.mktemp("single")))
    assert _fit(ParallelDims(tp=1, cp=1, dp=1, pp=1, world_size=1), [*COMMON, "train.threads=1"], str(run))
    return records(run)


def _pool_for(request, layout):
    return request.getfixturevalue("pool4" if layout == "pp2_dp2" else "pool")


def _run(pool, tmp_path, layout, wrong=None):
    extra, dims = LAYOUTS[layout]
    run = tmp_path / f"{layout}_{wrong or 'right'}"
    fused = pool.run(_fit, [*COMMON, *extra], str(run), wrong, layout=dims)
    return records(run), fused


def _losses(recs):
    return [r["loss"] for r in recs]


def _norms(recs):
    return [r["grad_norm"] for r in recs]


def _within(got, single):
    """(losses within 2^-8, gradient norms within 2^-6) of the single run: the module docstring's bounds."""
    losses = _losses(got) == pytest.approx(_losses(single), rel=2**-8)
    return losses, _norms(got) == pytest.approx(_norms(single), rel=2**-6)


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2_1f1b", "cp2_ring", "pp2_dp2"])
def test_layout_with_fusion_follows_the_single_process_run(request, single, tmp_path, layout):
    got, fused = _run(_pool_for(request, layout), tmp_path, layout)
    print(layout, "single:", [(r["loss"], r["grad_norm"]) for r in single])
    print(layout, "layout:", [(r["loss"], r["grad_norm"]) for r in got])
    assert len(got) == len(single) == STEPS
    # 2 blocks x 7 projections; a pp stage holds one block; the head (`output`) is never fused.
    want = 7 if layout.startswith("pp") else 14
    assert all(len(names) == want and not any(n.startswith("output") for n in names) for names in fused), fused
    assert _within(got, single) == (True, True)


# Unstepped fused weights move the losses (3% by step 4 at tp2 and pp2); an unreduced main_grad under cp (dp) is
# each rank's half of the tokens' gradient, which moves the first step's gradient norm far outside 2^-6 (the
# losses drift by 5e-4 only, inside 2^-8, as the ranks' updates still point the same way).
@pytest.mark.parametrize(
    "layout,wrong,leaves",
    [
        ("tp2_sp", "unstepped", "loss"),
        ("pp2_1f1b", "unstepped", "loss"),
        ("cp2_ring", "unreduced", "grad_norm"),
        ("pp2_dp2", "unreduced", "grad_norm"),
    ],
)
def test_wrong_main_grad_wiring_leaves_the_bound(request, single, tmp_path, layout, wrong, leaves):
    got, _ = _run(_pool_for(request, layout), tmp_path, layout, wrong)
    print(layout, wrong, [(r["loss"], r["grad_norm"]) for r in got], "single:", _losses(single), _norms(single))
    assert got[0]["loss"] == pytest.approx(single[0]["loss"], rel=2**-8)  # the same first forward
    losses_ok, norms_ok = _within(got, single)
    assert not (losses_ok if leaves == "loss" else norms_ok)
