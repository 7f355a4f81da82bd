"""Gradient-accumulation fusion under data parallelism on 2 gloo ranks: the reducer buckets the fused weights'
fp32 `main_grad` (megaeff/distributed/data_parallel/bucketed.py), launched from the fused Function's hooks, and
a dp=2 trainer run with `precision.grad_accum_fusion=true` follows the single-process one.

Bound (as tests/unit/test_grad_accum_fusion.py): every reduced main_grad element is an fp32 sum, in some order
(each rank's GEMMs, then gloo's sum), of the products dy^T x of all ranks' micro-batches; the operands are the
same bits wherever they are computed (equal weights, row-wise ops), so the sum is within n * 2^-24 * sum|terms|
of the exact one, n = all tokens plus one add per micro-batch and rank.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from megaeff.distributed.data_parallel.bucketed import GradReducer
from megaeff.layers import grad_accum_fusion as gaf
from megaeff.layers.linear import DenseLinear
from tests.distributed.harness import pool_fixture
from tests.helpers import compose, records, train_on_pool

pytestmark = pytest.mark.slow
pool = pool_fixture(2)

D_IN, D_H, D_OUT = 8, 16, 4
ROWS, ACCUM = 6, 3  # tokens per micro-batch per rank, micro-batches per step
U32 = 2.0**-24


class Tiny(torch.nn.Module):
    """Two fused dense layers around a non-fused bf16 scale (which keeps autograd's .grad)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2 = DenseLinear(D_IN, D_H), DenseLinear(D_H, D_OUT)
        self.scale = torch.nn.Parameter(torch.ones(D_H, dtype=torch.bfloat16))
        for layer in (self.fc1, self.fc2):
            layer.weight.data = (torch.randn(layer.weight.shape, generator=g) / 4).to(torch.bfloat16)

    def forward(self, x):
        return self.fc2(torch.nn.functional.silu(self.fc1(x)) * self.scale)


def data(n: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, D_IN, generator=g), torch.randn(n, D_OUT, generator=g)


def _fused_dp(dims, overlap):
    n = dims.dp * ACCUM * ROWS
    x, y = data(n)
    mine = slice(dims.dp_rank * ACCUM * ROWS, (dims.dp_rank + 1) * ACCUM * ROWS)
    model = Tiny()
    names = {id(p): n for n, p in model.named_parameters()}
    fused = gaf.enable(model)
    reducer = GradReducer(list(model.named_parameters()), dims, bucket_mb=1e-4, overlap=overlap)  # 3 buckets
    terms = {names[id(p)]: [] for p in fused}
    real = gaf.accumulate_wgrad

    def capture(main_grad, x2d, dy2d):  # this rank's products, for the exact reference
        (name,) = [names[id(p)] for p in fused if p.main_grad is main_grad]
        terms[name].append((x2d.clone(), dy2d.clone()))
        return real(main_grad, x2d, dy2d)

    steps = []
    gaf.accumulate_wgrad = capture
    try:
        for _ in range(2):  # the second step re-attaches the views after zero_grad(set_to_none=True)
            for p in model.parameters():
                p.grad = None
            gaf.zero_main_grads(model.parameters())
            for i, (xm, ym) in enumerate(zip(x[mine].chunk(ACCUM), y[mine].chunk(ACCUM))):
                reducer.prepare(final=i == ACCUM - 1)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(xm)
                (0.5 * ((out.float() - ym) ** 2).sum() / n).backward()
            reducer.finish()
            steps.append({nm: gaf.grad_of(p).clone() for nm, p in model.named_parameters()})
            steps[-1]["launched_in_backward"] = reducer.launched_in_backward
    finally:
        gaf.accumulate_wgrad = real
    buffers = {b.buffer.untyped_storage().data_ptr() for b in reducer.buckets}
    views = all(p.main_grad.untyped_storage().data_ptr() in buffers for p in fused)
    info = dict(
        views=views,
        grad_none=all(p.grad is None for p in fused),
        dtypes=sorted(str(b.buffer.dtype) for b in reducer.buckets),
        buckets=reducer.num_buckets,
        terms={k: v[:ACCUM] for k, v in terms.items()},  # the first step's
    )
    reducer.remove()
    return steps, info


@pytest.mark.parametrize("overlap", [True, False])
def test_reducer_sums_fused_main_grads_in_fp32(pool, overlap):
    res = pool.run(_fused_dp, overlap, layout=dict(dp=2))
    (steps0, info0), (steps1, _) = res
    assert info0["views"] and info0["grad_none"]
    assert info0["dtypes"] == ["torch.bfloat16", "torch.float32", "torch.float32"]  # scale; fc2; fc1
    for name in ("fc1.weight", "fc2.weight"):
        got = steps0[0][name]
        assert got.dtype == torch.float32
        assert torch.equal(got, steps1[0][name])  # one all-reduce result on every rank
        assert torch.equal(got, steps0[1][name])  # step 2 started from zero, not from step 1's sum
        pairs = [pr for _, info in res for pr in info["terms"][name]]
        exact = sum(dy.double().t() @ x.double() for x, dy in pairs)
        mag = sum(dy.double().abs().t() @ x.double().abs() for x, dy in pairs)
        bound = (2 * ACCUM * ROWS + 2 * ACCUM) * U32 * mag
        assert ((got.double() - exact).abs() <= bound).all(), name
        # The bound tells a missing reduction: one rank's own sum is far outside it.
        own = sum(dy.double().t() @ x.double() for x, dy in info0["terms"][name])
        assert ((own - exact).abs() > bound).any()
    assert torch.equal(steps0[0]["scale"], steps1[0]["scale"]) and steps0[0]["scale"].dtype == torch.bfloat16
    want = info0["buckets"] if overlap else 0  # the fused Function's hooks launch their buckets during backward
    assert steps0[0]["launched_in_backward"] == want and steps0[1]["launched_in_backward"] == want


def test_dp2_trainer_run_with_fusion_follows_the_single_process_run(pool, tmp_path):
    """The same global batch (micro 4 x dp 2 x accum 2 vs micro 4 x accum 4): the first loss is the same forward,
    later ones differ by the updates' rounding (the bf16 .grad of norms, embedding and head is summed over
    ranks in another order), far below one bf16 rounding of the loss, 2^-8."""
    from megaeff.distributed.dims import ParallelDims
    from megaeff.train.trainer import Trainer

    common = [
        "experiment=smoke",
        "precision=bf16",
        "precision.param_dtype=bf16",
        "precision.grad_accum_fusion=true",
        "train.steps=4",
        "train.eval_interval=0",
        "train.ckpt_interval=0",
        "train.plot=false",
        "train.log_interval=1",
        "parallel.bucket_mb=0.01",
    ]
    single = Path(tempfile.mkdtemp(dir=tmp_path))
    cfg = compose([*common, "train.grad_accum=4", f"run_dir={single}", "train.threads=1"])
    trainer = Trainer(cfg, ParallelDims(tp=1, cp=1, dp=1, pp=1, world_size=1), single)
    try:
        trainer.fit()
    finally:
        trainer.close()
    dp2 = tmp_path / "dp2"
    train_on_pool(pool, dp2, *common, "train.grad_accum=2", "parallel.dp=2", layout=dict(dp=2))
    ref, got = records(single), records(dp2)
    assert len(ref) == len(got) == 4
    print("single:", [(r["loss"], r["grad_norm"]) for r in ref], "dp2:", [(r["loss"], r["grad_norm"]) for r in got])
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=2**-8)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=2**-6)
