"""FSSDP's memory under a pipeline, on the fake-tensor step (megaeff/train/memory/fake_step.py; one rank of the
layout, the other ranks a fake process group, so no processes are started).

What FSSDP adds to the all-reduce layout's peak is a constant number of unit-sized buffers, independent of the
depth and of the micro-batches in flight (engine.py's module docstring, "Memory"); what it saves grows with the
layers the rank holds. So per layer per virtual stage FSSDP's peak grows by exactly v (1 - 1/d) 2U less (U: one
block's fp32 bytes; parameters and gradients at 1/d, no optimizer state yet in step 0's backward), and beyond a
few layers per rank it is below the all-reduce peak. Before the rest-unit fix the tensor-parallel embedding's
gathered copy was kept once per in-flight micro-batch of the first stage; the second test pins the fix by
measuring the old behaviour."""

from __future__ import annotations

import pytest

from megaeff.config import compose
from megaeff.distributed.fssdp import engine as fssdp_engine
from megaeff.train.memory.fake_step import measure_step
from megaeff.train.planner.enumerate import Layout, apply

pytestmark = pytest.mark.slow  # 6 fake steps, about a minute on two cores

BASE = ["model=tiny", "precision=bf16", "model.dim=256", "model.ffn_dim=512", "model.n_heads=4", "data.seq_len=16"]
DIM, FFN = 256, 512
U = (4 * DIM * DIM + 3 * DIM * FFN) * 4  # one block's fp32 bytes (q, k, v, o; gate, up, down), 2,621,440


def peak(layout: Layout, layers_per_stage: int, rank: int = 0) -> int:
    cfg = apply(compose(BASE), layout)
    cfg.model.n_layers = layers_per_stage * layout.pp * layout.pp_virtual
    cfg.parallel.pp_boundaries = []
    return measure_step(cfg, rank).peak_bytes


def test_fssdp_interleaved_pipeline_saves_what_sharding_saves():
    """pp4 x 2 chunks, 8 micro-batches (the planner's steady state, 2 pp), rank 0, dp2 FSSDP (bf16 gathers)
    against the all-reduce dp1 rank. Measured: all-reduce 83,442,056 / 110,610,952 B at 3 / 4 layers per
    virtual stage, FSSDP 82,460,400 / 104,386,416 B."""
    inter = dict(pp_schedule="interleaved", pp_virtual=2)
    ar = {k: peak(Layout(1, 1, 1, 4, 1, 8, **inter), k) for k in (3, 4)}
    fs = {k: peak(Layout(1, 1, 2, 4, 1, 8, **inter, dp_impl="fssdp", gather_dtype="bf16"), k) for k in (3, 4)}
    d, v = 2, 2
    saved_per_k = v * (d - 1) * 2 * U // d  # parameters + gradients of v more blocks, (1 - 1/d) of them
    # Exact (the tracker counts bytes): every in-flight tensor of a layer is the same in both layouts (the bf16
    # weight copies autocast saves per in-flight chunk, the activations), only the sharded state differs.
    assert (ar[4] - ar[3]) - (fs[4] - fs[3]) == saved_per_k
    # The constant FSSDP adds, named in engine.py ("Memory"): max_inflight = 2 reduce-scatters (fp32 send U and
    # output U/2 each: 3U), the prefetched gather (bf16: U/4 + U/2), the refill (its gather U/4 + U/2, the
    # unpacked fp32 U, the refilled storage U): 6.5U, the rest is where in the op sequence the peak falls.
    # Measured 5.6U; a per-micro-batch or per-layer term would exceed 7U at once (it did: the rest-unit, below).
    for k in (3, 4):
        extra = fs[k] - ar[k] + k * saved_per_k
        assert 0 < extra <= 7 * U, (k, extra / U)
    assert fs[4] < ar[4]  # 4 layers per stage: 8 blocks on the rank save 8U, more than the constant


def test_rest_unit_keeps_one_gathered_copy_under_gpipe(monkeypatch):
    """tp2 x pp2 (GPipe, 4 micro-batches) x dp2 FSSDP, rank 0: the tensor-parallel embedding is the rest-unit
    (not the sparse path). GPipe runs all 4 forwards first; the rest-unit is now resharded when its next forward
    starts, so one gathered copy is kept, not 4. Measured 9,537,528 B, against 9,807,864 B with the old rule
    (the peak falls in the second backward: the first released its copy, the second refills its own, the old rule
    still held the other two: 2R more, R = 135,168 B, the fp32 [132, 256] tp-shard of the embedding)."""
    engines = []
    init = fssdp_engine.FSSDPEngine.__init__

    def capture(self, *args, **kwargs):
        init(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(fssdp_engine.FSSDPEngine, "__init__", capture)
    layout = Layout(2, 1, 2, 2, 1, 4, pp_schedule="gpipe", sequence_parallel=True, dp_impl="fssdp", gather_dtype="bf16")
    fixed = peak(layout, 1)
    rest = engines[-1].plan.rest
    assert [s.name for f in rest.flats for s in f.shards] == ["tok_embeddings.weight"]
    R = sum(s.full_numel for f in rest.flats for s in f.shards) * 4  # unpacked to fp32
    monkeypatch.setattr(fssdp_engine.FSSDPEngine, "_reshard_kept_rest", lambda self, unit: None)  # the old rule
    old = peak(layout, 1)
    assert old - fixed == 2 * R
