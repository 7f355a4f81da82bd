"""Trainer behaviour in one process: token-weighted accumulation, bit-exact resume, stop-and-save, checkpoints."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from megaeff.data.gpt_dataset import collate
from megaeff.data.sampler import IGNORE_INDEX
from megaeff.distributed.dims import ParallelDims
from megaeff.errors import CheckpointError
from megaeff.train.checkpoint import file_entry
from megaeff.train.signals import StopRequest
from megaeff.train.trainer import Trainer


def make_trainer(cfg, stop=None):
    dims = ParallelDims.from_config(cfg.parallel, world_size=1)
    return Trainer(cfg, dims, Path(cfg.run_dir), stop=stop)


class PaddedView:
    """Wraps a packed dataset and masks a sample-dependent number of labels, so micro-batches differ in their
    count of real tokens (as with per-document padding)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def sample(self, i):
        s = dict(self.base.sample(i))
        s["labels"] = s["labels"].clone()
        s["labels"][: (i * 7) % (len(s["labels"]) - 1)] = IGNORE_INDEX
        return s

    def batch(self, indices):
        return collate([self.sample(int(i)) for i in indices])


def test_grad_accumulation_equals_one_big_batch(tmp_path, smoke_cfg):
    """4 micro-batches of 2 give the same loss and gradients as 1 batch of 8, with unequal padding."""
    results = []
    for micro, accum in ((8, 1), (2, 4)):
        cfg = smoke_cfg(
            tmp_path / f"m{micro}",
            f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            "optim.grad_clip=0",
            "train.ckpt_interval=0",
        )
        tr = make_trainer(cfg)
        tr.data.train = PaddedView(tr.data.train)
        m = tr.train_step()
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
        results.append((m, grads))
        tr.close()
    (m_big, g_big), (m_acc, g_acc) = results
    assert m_big["tokens"] == m_acc["tokens"] < 8 * 32  # padding really removed tokens
    assert m_acc["loss"] == pytest.approx(m_big["loss"], rel=1e-6)
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-5, atol=1e-7, msg=name)


def test_naive_per_micro_batch_mean_would_differ(tmp_path, smoke_cfg):
    """Guards the test above: with unequal padding, averaging per-micro-batch means gives another gradient."""
    cfg = smoke_cfg(tmp_path, "train.micro_batch_size=2", "train.grad_accum=4")
    tr = make_trainer(cfg)
    view = PaddedView(tr.data.train)
    batches = [view.batch(range(2 * k, 2 * k + 2)) for k in range(4)]
    counts = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches]
    assert len(set(counts)) > 1

    def grad(weights):
        tr.model.zero_grad()
        for b, w in zip(batches, weights):
            (tr.runner.loss_sum(b) * w).backward()
        return torch.cat([p.grad.flatten() for p in tr.model.parameters()])

    weighted = grad([1 / sum(counts)] * 4)
    naive = grad([1 / (4 * c) for c in counts])
    assert (weighted - naive).norm() > 1e-2 * weighted.norm()
    tr.close()


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["precision=coat", "optim.min_fp8_numel=0", "optim.fp8_backend=torch"],
        # bf16 weights: the stochastic rounding noise is a function of (parameter, update count), not of RNG state
        ["precision=coat", "precision.autocast_bf16=true", "precision.param_dtype=bf16", "optim.fp8_backend=torch"],
    ],
    ids=["fp32", "coat-fp8-states", "bf16-weights-coat"],
)
def test_resume_is_bit_exact(tmp_path, smoke_cfg, extra):
    full = make_trainer(smoke_cfg(tmp_path / "full", *extra))
    want = torch.bfloat16 if "precision.param_dtype=bf16" in extra else torch.float32
    assert {p.dtype for p in full.model.parameters()} == {want}
    ref = full.fit()
    ref_params = {n: p.detach().clone() for n, p in full.model.named_parameters()}
    full.close()

    cfg = smoke_cfg(tmp_path / "split", "train.exit_interval=4", *extra)
    first = make_trainer(cfg)
    part1 = first.fit()
    assert part1.preempted
    first.close()
    assert part1.step == 4 and (tmp_path / "split/checkpoints/step_00000004").is_dir()
    second = make_trainer(cfg)
    assert second.step == 4 and second.consumed_samples == 4 * cfg.train.micro_batch_size
    part2 = second.fit()
    assert part1.losses + part2.losses == ref.losses  # exact float equality, step by step
    for n, p in second.model.named_parameters():
        assert torch.equal(p, ref_params[n]), n
    assert part2.final_eval == ref.final_eval
    for (n, p), q in zip(second.model.named_parameters(), full.model.parameters()):
        for key, value in full.optimizer.state[q].items():
            got = second.optimizer.state[p][key]
            bits = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731  (FP8 tensors have no ==)
            assert got.dtype == value.dtype and torch.equal(bits(got), bits(value)), (n, key)
    second.close()

    # The metrics file reads as one uninterrupted history.
    lines = (tmp_path / "split/metrics.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]
    assert steps == sorted(set(steps))


def test_sigterm_saves_and_stops_at_step_boundary(tmp_path, smoke_cfg):
    cfg = smoke_cfg(tmp_path, "train.ckpt_interval=0")
    with StopRequest() as stop:
        tr = make_trainer(cfg, stop=stop)
        os.kill(os.getpid(), signal.SIGTERM)
        result = tr.fit()
        tr.close()
    assert result.preempted and result.step == 1
    assert result.checkpoint == tmp_path / "checkpoints/step_00000001"
    assert (tmp_path / "checkpoints/latest").read_text() == "step_00000001"
    resumed = make_trainer(cfg)
    assert resumed.step == 1
    assert resumed.fit().step == cfg.train.steps
    resumed.close()


def test_keep_last_and_latest_pointer(tmp_path, smoke_cfg):
    tr = make_trainer(smoke_cfg(tmp_path, "train.ckpt_interval=2", "train.keep_last=2"))
    tr.fit()
    tr.close()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]
    assert (root / "latest").read_text() == "step_00000008"


@pytest.fixture
def saved_run(tmp_path, smoke_cfg):
    cfg = smoke_cfg(tmp_path / "run", "train.exit_interval=4")
    tr = make_trainer(cfg)
    tr.fit()
    tr.close()
    return cfg, tmp_path / "run/checkpoints/step_00000004"


def _resume_error(smoke_cfg, cfg, resume, *extra) -> str:
    with pytest.raises(CheckpointError) as info:
        make_trainer(smoke_cfg(cfg.run_dir, f"train.resume={resume}", *extra))
    return str(info.value)


def test_truncated_checkpoint_is_rejected(saved_run, smoke_cfg):
    cfg, step_dir = saved_run
    data = (step_dir / "__0_0.distcp").read_bytes()  # the rank's tensor data (DCP)
    (step_dir / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    assert "truncated" in _resume_error(smoke_cfg, cfg, step_dir)


def test_checkpoint_without_manifest_is_incomplete(saved_run, smoke_cfg):
    cfg, step_dir = saved_run
    (step_dir / "manifest.json").unlink()
    assert "incomplete" in _resume_error(smoke_cfg, cfg, step_dir)


def test_missing_checkpoint_path(saved_run, smoke_cfg):
    cfg, step_dir = saved_run
    assert "does not exist" in _resume_error(smoke_cfg, cfg, step_dir.parent / "step_99999999")


def test_pickled_object_is_never_loaded(saved_run, smoke_cfg):
    """weights_only=True: a checkpoint file carrying an arbitrary object is refused, not executed."""
    cfg, step_dir = saved_run
    marker = step_dir / "executed"

    class Exploit:  # unpickling this would run a shell command
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = {"step": 4, "hook": Exploit()}
    with open(step_dir / "trainer.pt", "wb") as f:
        torch.save(payload, f)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["trainer.pt"] = file_entry(step_dir / "trainer.pt")  # size and checksum both match
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    assert "cannot read trainer.pt" in _resume_error(smoke_cfg, cfg, step_dir)
    assert not marker.exists()


def test_auto_resume_skips_dangling_latest(saved_run, smoke_cfg):
    cfg, step_dir = saved_run
    (step_dir.parent / "latest").write_text("step_00000099")
    tr = make_trainer(smoke_cfg(cfg.run_dir))
    assert tr.step == 4
    tr.close()


def test_checkpoint_for_a_different_model_is_rejected(saved_run, smoke_cfg):
    cfg, step_dir = saved_run
    with pytest.raises(CheckpointError, match="do not match"):
        make_trainer(smoke_cfg(cfg.run_dir, "model.dim=64", "model.ffn_dim=128"))


def test_fp32_checkpoint_does_not_resume_into_fp8_states(saved_run, smoke_cfg):
    cfg, step_dir = saved_run
    message = _resume_error(smoke_cfg, cfg, step_dir, "precision=coat", "optim.min_fp8_numel=0")
    # The resume policy (megaeff/train/resume_policy.py) refuses the state-format change by its config fields before
    # loading; the optimizer's own check of the loaded state is tests/unit/test_coat_adamw.py's.
    assert "precision.name: 'fp32' -> 'coat'" in message and "a resume cannot change them" in message


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path, smoke_cfg):
    tr = make_trainer(smoke_cfg(tmp_path, "precision=bf16", "train.steps=2", "optim.warmup_steps=1"))
    res = tr.fit()
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    assert all(v.dtype == torch.float32 for s in tr.optimizer.state.values() for k, v in s.items() if k != "step")
    assert torch.isfinite(torch.tensor(res.losses)).all()
    tr.close()


def test_wandb_offline_run_keeps_its_id_across_resume(tmp_path, smoke_cfg):
    import wandb  # noqa: F401  (in the test extra: a missing install must fail, not skip)

    cfg = smoke_cfg(tmp_path, "logging=wandb", "train.exit_interval=4")
    first = make_trainer(cfg)
    first.fit()
    run_id = first.log._wandb.run.id
    first.close()
    assert (tmp_path / "wandb_id.txt").read_text() == run_id
    second = make_trainer(cfg)
    assert second.log._wandb.run.id == run_id
    second.fit()
    second.close()
    offline = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline)
