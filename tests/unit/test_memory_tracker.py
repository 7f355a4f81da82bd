"""The whole-step memory tracker (megaeff/train/memory/): one training step on fake tensors, against torch's own
live-tensor tracker on the real CPU step, and its breakdown against what the step's objects hold."""

from __future__ import annotations

import warnings

import pytest
import torch

from megaeff.config import compose
from megaeff.train.memory.fake_step import measure_step, reference_peak
from megaeff.train.memory.tracker import CATEGORIES, StepMemoryTracker

# Small enough for a second per step; two micro-batches so that accumulation and the phase between them run.
TINY = ["model=tiny", "train.micro_batch_size=2", "data.seq_len=64", "train.grad_accum=2"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def tiny_cfg():
    return compose(TINY)


@pytest.fixture(scope="module")
def fake_report(tiny_cfg):
    return measure_step(tiny_cfg)


def test_fake_peak_equals_torch_memtracker_on_the_real_step_to_the_byte():
    # Both count live tensor storages once, after each op, with no allocator rounding on the CPU: no tolerance.
    # One micro-batch: MemTracker refuses a second forward of the same module in one tracking context.
    cfg = compose(TINY[:-1] + ["train.grad_accum=1"])
    fake = measure_step(cfg).peak_bytes
    assert fake == reference_peak(cfg)["Total"]
    assert fake == measure_step(cfg, fake=False).peak_bytes


def test_accumulation_fake_equals_real(tiny_cfg, fake_report):
    assert measure_step(tiny_cfg, fake=False).peak_bytes == fake_report.peak_bytes


def test_breakdown_matches_what_the_step_holds(tiny_cfg):
    report = measure_step(tiny_cfg, fake=False)
    extra = report.extra
    assert sum(report.breakdown.values()) == report.peak_bytes
    # The parameters live through the whole step: at the peak and at the end they are exactly the parameters.
    assert report.breakdown["parameters"] == extra["param_bytes"] > 0
    # After the optimizer step: the gradients (kept until the next zero_grad) and AdamW's moments and counters.
    final = report.final_breakdown
    assert final["parameters"] == extra["param_bytes"]
    assert final["gradients"] == extra["grad_bytes"] > 0
    assert final["optimizer_state"] == extra["optimizer_state_bytes"] > 0
    assert final["activations"] == final["temporaries"] == 0
    # What a forward leaves for its backward is what SavedBytes (autograd's saved-tensor hooks, in PlainStep)
    # counts, less the token ids (saved by the embedding, but made before the forward; the fused head + loss saves
    # no labels) plus the fp32 scalars the step keeps without autograd saving them (the loss and the objective: at
    # most 3 x 4 bytes).
    batch_bytes = 2 * 64 * 8  # inputs, int64
    extra_scalars = report.saved_per_forward[0] - (extra["act_saved_bytes"] - batch_bytes)
    assert 0 <= extra_scalars <= 12
    assert len(report.saved_per_forward) == 2 and report.saved_per_forward[0] == report.saved_per_forward[1]


def test_phase_of_the_peak_and_categories(fake_report):
    assert fake_report.phase in {"forward", "backward", "clip", "optimizer", "between_microbatches"}
    assert set(fake_report.breakdown) == set(CATEGORIES)
    assert fake_report.extra["optimizer_stepped"]


class _IgnoresFrees(StepMemoryTracker):
    """A wrong tracker: storages never die."""

    def _died(self, key: int) -> None:
        self._refs.pop(key, None)


class _CountsViews(StepMemoryTracker):
    """A wrong tracker: every op output counted as a new storage, views included."""

    def _key(self, st):
        self._n = getattr(self, "_n", 0) + 1
        return (st._cdata, self._n)


@pytest.mark.parametrize("wrong", [_IgnoresFrees, _CountsViews])
def test_wrong_trackers_do_not_match_the_reference(tiny_cfg, fake_report, wrong):
    assert measure_step(tiny_cfg, tracker_cls=wrong).peak_bytes != fake_report.peak_bytes


def test_two_rank_fake_layouts_are_this_ranks_share(tiny_cfg, fake_report):
    # Tensor parallelism halves every projection and the vocabulary; FSSDP shards every parameter over dp.
    single = fake_report.extra["param_bytes"]
    tp = [measure_step(compose(TINY + ["parallel.tp=2"]), rank=r) for r in (0, 1)]
    for report in tp:
        assert report.extra["layout"]["tp"] == 2
        assert report.breakdown["parameters"] == report.extra["param_bytes"] < single
        assert report.final_breakdown["optimizer_state"] == report.extra["optimizer_state_bytes"]
    assert tp[0].peak_bytes == tp[1].peak_bytes  # symmetric ranks
    fssdp = measure_step(compose(TINY + ["parallel.dp=2", "parallel.dp_impl=fssdp"]), rank=1)
    assert fssdp.final_breakdown["parameters"] == fssdp.extra["param_bytes"] <= single // 2 + 4096
    assert fssdp.peak_bytes < fake_report.peak_bytes


def test_storage_counted_once_and_freed():
    # One op-level check without a model: a view shares its storage; a freed tensor leaves the count.
    w = torch.nn.Linear(4, 4)
    tracker = StepMemoryTracker(w)
    with tracker:
        a = torch.zeros(256)  # 1024 bytes
        b = a.view(16, 16)  # same storage
        c = torch.ones(512)  # 2048 bytes
        del c
        d = torch.ones(128)  # 512 bytes
    report = tracker.report()
    params = sum(p.numel() * 4 for p in w.parameters())
    assert report.peak_bytes == params + 1024 + 2048
    assert report.final_bytes == params + 1024 + 512
    del a, b, d
