"""The checkpoint files in one process (megaeff/train/checkpoint/): what the manifest guards, what `latest` and
pruning do, failures that must lose nothing, format 1 still loading, the converters, and the asynchronous save.

Runs are the smoke experiment, in-process (the CLI where the exit code is what is tested). Bit-for-bit checks
compare the logical tensors `read_logical_checkpoint` returns (FP8 codes as bytes)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from megaeff.cli.convert import main as convert_main
from megaeff.distributed.dims import ParallelDims
from megaeff.errors import EXIT_DISK_FULL, EXIT_PREEMPTED, CheckpointError, DiskFullError
from megaeff.train import checkpoint as ckpt
from megaeff.train.checkpoint import files as ckpt_files
from megaeff.train.trainer import Trainer
from tests.helpers import PYTHON, cli_env

STEP4 = "step_00000004"


def make_trainer(cfg):
    return Trainer(cfg, ParallelDims.from_config(cfg.parallel, world_size=1), Path(cfg.run_dir))


def run(cfg, writer=None):
    tr = make_trainer(cfg)
    tr.checkpointer.writer = writer
    try:
        return tr.fit(), tr
    finally:
        tr.close()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def assert_same_logical(a: dict, b: dict) -> None:
    """Model and optimizer state of two `read_logical_checkpoint` results, bit for bit."""
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert a["model"][k].dtype == b["model"][k].dtype and torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for n in sa:
        assert sa[n].keys() == sb[n].keys(), n
        for k in sa[n]:
            assert sa[n][k].dtype == sb[n][k].dtype and torch.equal(bits(sa[n][k]), bits(sb[n][k])), (n, k)
    assert hparams(a) == hparams(b)


def hparams(data: dict) -> list:
    """Param groups with their names as a set (a load matches names, not their order)."""
    return [dict(g, names=sorted(g["names"])) for g in data["optimizer"]["hparams"]]


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    """A run stopped at step 4 (exit_interval) after a checkpoint at step 2: two complete checkpoints."""
    from tests.helpers import compose

    run_dir = tmp_path_factory.mktemp("saved") / "run"
    run(
        compose(
            [
                "experiment=smoke",
                f"run_dir={run_dir}",
                "train.plot=false",
                "train.threads=1",
                "train.exit_interval=4",
                "train.ckpt_interval=2",
            ]
        )
    )
    return run_dir


@pytest.fixture
def saved(saved_once, tmp_path, smoke_cfg):
    """A copy of that run for one test to damage: (its config, its checkpoints directory)."""
    shutil.copytree(saved_once, tmp_path / "run")
    return smoke_cfg(tmp_path / "run"), tmp_path / "run" / "checkpoints"


# ------------------------------------------------------------------------------------------- integrity
def test_manifest_has_a_checksum_per_file_and_a_flipped_byte_is_caught(saved):
    _, root = saved
    manifest = json.loads((root / STEP4 / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["step"] == 4
    names = {p.name for p in (root / STEP4).iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == names
    assert {".metadata", "__0_0.distcp", "trainer.pt", "optimizer.pt", "config.yaml", "rng_rank0.pt"} <= names
    for name, entry in manifest["files"].items():
        assert entry == ckpt.file_entry(root / STEP4 / name)
    ckpt.verify_checkpoint(root / STEP4)
    data = bytearray((root / STEP4 / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit, the file size unchanged
    (root / STEP4 / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp is corrupt: CRC-32"):
        ckpt.verify_checkpoint(root / STEP4)


def test_corrupt_latest_falls_back_to_the_newest_that_verifies(saved, smoke_cfg, capsys):
    cfg, root = saved
    data = bytearray((root / STEP4 / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / STEP4 / "__0_0.distcp").write_bytes(bytes(data))
    capsys.readouterr()
    tr = make_trainer(smoke_cfg(cfg.run_dir))
    tr.close()
    out = capsys.readouterr().out
    assert tr.step == 2 and tr.resumed_from == root / "step_00000002"
    assert f"{STEP4}" in out and "is corrupt" in out and "falling back" in out
    assert "the newest checkpoint that verifies" in out
    # An explicit path is not replaced by another checkpoint: the corruption is the error.
    with pytest.raises(CheckpointError, match="is corrupt"):
        make_trainer(smoke_cfg(cfg.run_dir, f"train.resume={root / STEP4}"))


def test_no_checkpoint_verifies_is_one_error(saved, smoke_cfg):
    cfg, root = saved
    for step_dir in root.glob("step_*"):
        (step_dir / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        make_trainer(smoke_cfg(cfg.run_dir))


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x81binary", b"../../etc/passwd", b"step_00000099"])
def test_unusable_latest_pointer_falls_back(saved, smoke_cfg, capsys, content):
    cfg, root = saved
    (root / "latest").write_bytes(content)
    capsys.readouterr()
    tr = make_trainer(smoke_cfg(cfg.run_dir))
    tr.close()
    out = capsys.readouterr().out
    assert tr.step == 4  # the newest by write order
    assert "latest" in out and "taking the newest checkpoint that verifies" in out


def test_malicious_dcp_metadata_is_refused_not_executed(saved, tmp_path, smoke_cfg):
    cfg, root = saved
    marker = tmp_path / "executed"

    class Exploit:  # unpickling this would run a shell command
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    step_dir = root / STEP4
    (step_dir / ".metadata").write_bytes(pickle.dumps(Exploit()))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][".metadata"] = ckpt.file_entry(step_dir / ".metadata")  # the checksum matches the attack
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refusing to load (posix|os).system"):
        make_trainer(smoke_cfg(cfg.run_dir, f"train.resume={step_dir}"))
    with pytest.raises(CheckpointError, match="refusing"):
        ckpt.read_logical_checkpoint(step_dir)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- pruning
def test_pruning_follows_write_order_not_step_names(tmp_path):
    """Issue 18 item 2, its three commands: a reused run_dir holds a previous run's higher steps; the new run's
    checkpoints are kept, `latest` names them, and the rerun resumes the new run."""
    run_dir = tmp_path / "b"

    def cli(*args, expect):
        proc = subprocess.run(
            [PYTHON, "-m", "megaeff.train", "experiment=smoke", f"run_dir={run_dir}", "train.plot=false", *args],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=300,
        )
        assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    root = run_dir / "checkpoints"
    cli(expect=0)
    assert (root / "latest").read_text() == "step_00000008"
    cli("train.resume=none", "train.ckpt_interval=1", "train.keep_last=2", "train.exit_interval=3", expect=75)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert (root / "latest").read_text() == "step_00000003"
    out = cli("train.ckpt_interval=1", "train.keep_last=2", expect=0)
    assert f"resumed from {root / 'step_00000003'} at step 3" in out
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000007", "step_00000008"]
    assert (root / "latest").read_text() == "step_00000008"


def test_prune_never_removes_the_checkpoint_just_written(tmp_path):
    root = tmp_path / "checkpoints"
    for i, step in enumerate([9, 8, 7]):  # written in this order: 7 is the newest
        (root / f"step_0000000{step}").mkdir(parents=True)
        (root / f"step_0000000{step}" / "manifest.json").write_text(json.dumps({"seq": i + 1, "files": {}}))
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000009", "step_00000008", "step_00000007"]
    removed = ckpt.prune_checkpoints(root, 1, keep=root / "step_00000007")
    assert [p.name for p in removed] == ["step_00000009", "step_00000008"]
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000007"]


# ------------------------------------------------------------------------------------------- failures
class FullDiskWriter(FileSystemWriter):
    """DCP's writer on a disk that fills up: writes part of the rank's file, then ENOSPC."""

    def write_data(self, plan, planner):
        path = Path(self.path) / "__0_0.distcp"
        path.write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_during_save_loses_nothing(saved, smoke_cfg):
    cfg, root = saved
    before = {p.name: ckpt.file_entry(p) for p in (root / STEP4).iterdir()}
    tr = make_trainer(smoke_cfg(cfg.run_dir, "train.ckpt_interval=1", "train.steps=8"))
    tr.checkpointer.writer = FullDiskWriter
    with pytest.raises(DiskFullError) as info:
        tr.fit()
    tr.close()
    assert str(info.value) == f"no space left on device while writing {root / '.tmp-step_00000005' / '__0_0.distcp'}"
    assert (root / "latest").read_text() == STEP4
    assert {p.name: ckpt.file_entry(p) for p in (root / STEP4).iterdir()} == before
    assert not list(root.glob(".tmp-*"))
    ckpt.verify_checkpoint(root / STEP4)


def test_disk_full_in_a_small_file(saved, smoke_cfg, monkeypatch):
    cfg, root = saved
    real = ckpt_files.fsync_write

    def full(path, data):
        if "rng_rank" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckpt_files, "fsync_write", full)
    tr = make_trainer(smoke_cfg(cfg.run_dir, "train.ckpt_interval=1"))
    with pytest.raises(DiskFullError, match=r"while writing .*\.tmp-step_00000005/rng_rank0\.pt$"):
        tr.fit()
    tr.close()
    assert (root / "latest").read_text() == STEP4 and not list(root.glob(".tmp-*"))


def test_disk_full_exit_code_from_the_cli(saved):
    """A real ENOSPC in a real run: the `latest` pointer's temporary file is a link to /dev/full."""
    cfg, root = saved
    (root / ".latest.tmp").symlink_to("/dev/full")
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "megaeff.train",
            "experiment=smoke",
            f"run_dir={cfg.run_dir}",
            "train.plot=false",
            "train.ckpt_interval=1",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert proc.returncode == EXIT_DISK_FULL != EXIT_PREEMPTED, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"megaeff: error: no space left on device while writing {root / '.latest.tmp'}"
    )
    assert "Traceback" not in proc.stderr
    assert (root / "latest").read_text() == STEP4  # the pointer never moved: the resume takes step 4
    ckpt.verify_checkpoint(root / STEP4)


def _load_into(smoke_cfg, root, *overrides) -> str:
    """Load the step-4 checkpoint into a model built with `overrides` (resume_policy.py refuses such a resume
    before loading; the loader's own check is what is tested here)."""
    tr = make_trainer(smoke_cfg(root.parent / "other", "train.resume=none", *overrides))
    tr.close()
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(root / STEP4, model=tr.model, optimizer=tr.optimizer, rank=0)
    return str(info.value)


def test_checkpoint_of_another_shape_names_the_differences(saved, smoke_cfg):
    _, root = saved
    lines = _load_into(smoke_cfg, root, "model.dim=64", "model.ffn_dim=128").splitlines()
    assert "do not match the configured model" in lines[0] and len(lines) == 6  # head, 4 shown, the count
    assert lines[1].strip() == "layers.0.attention.k.weight: checkpoint (32, 32) vs model (64, 64)"
    assert lines[-1].strip().startswith("... and ") and lines[-1].strip().endswith(" more that differ")
    lines = _load_into(smoke_cfg, root, "method=lowrank", "method.rank=8").splitlines()
    assert len(lines) == 3, lines
    assert lines[1].strip() == (
        "missing from the checkpoint: layers.0.attention.k.A, layers.0.attention.k.B, layers.0.attention.o.A, "
        "layers.0.attention.o.B (and 24 more)"
    )
    assert lines[2].strip().startswith("unexpected in the checkpoint: layers.0.attention.k.weight")


# ------------------------------------------------------------------------------------------- format 1
@pytest.mark.parametrize(
    "extra", [[], ["precision=coat", "optim.min_fp8_numel=0", "optim.fp8_backend=torch"]], ids=["fp32", "coat"]
)
def test_format_1_checkpoint_resumes_bit_exact(tmp_path, smoke_cfg, extra):
    """A format-1 checkpoint (what megaeff wrote before) resumes into the same run as an uninterrupted one."""
    ref, full = run(smoke_cfg(tmp_path / "full", *extra))
    first = make_trainer(smoke_cfg(tmp_path / "split", "train.exit_interval=4", "train.ckpt_interval=0", *extra))
    part1 = first.fit()
    path = ckpt.save_v1(
        tmp_path / "v1",
        4,
        model=first.model,
        optimizer=first.optimizer,
        trainer_state={
            "step": 4,
            "consumed_samples": first.consumed_samples,
            "scheduler": first.scheduler.state_dict(),
        },
        config_yaml=(tmp_path / "split" / "checkpoints" / STEP4 / "config.yaml").read_text(),
        rank=0,
        world_size=1,
    )
    first.close()
    assert {p.name for p in path.iterdir()} >= {"model.pt", "optimizer.pt", "trainer.pt", "manifest.json"}
    assert ckpt.read_logical_checkpoint(path)["format_version"] == 1
    v2 = ckpt.read_logical_checkpoint(tmp_path / "split" / "checkpoints" / STEP4)
    assert_same_logical(ckpt.read_logical_checkpoint(path), v2)
    second = make_trainer(smoke_cfg(tmp_path / "resumed", f"train.resume={path}", *extra))
    part2 = second.fit()
    second.close()
    assert part1.losses + part2.losses == ref.losses
    assert_same_logical(
        ckpt.read_logical_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000008"),
        ckpt.read_logical_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000008"),
    )


# ------------------------------------------------------------------------------------------- converters
def test_convert_to_one_file_and_back(saved, tmp_path, smoke_cfg, capsys):
    cfg, root = saved
    out_file, back = tmp_path / "consolidated.pt", tmp_path / "back"
    convert_main(["dcp-to-torch", str(root / STEP4), str(out_file)])
    data = torch.load(out_file, weights_only=True)
    original = ckpt.read_logical_checkpoint(root / STEP4)
    assert_same_logical(data, original)
    assert data["trainer"]["step"] == 4 and "model:" in data["config_yaml"]
    convert_main(["torch-to-dcp", str(out_file), str(back)])
    assert_same_logical(ckpt.read_logical_checkpoint(back), original)
    tr = make_trainer(smoke_cfg(tmp_path / "from_converted", f"train.resume={back}"))
    assert tr.step == 4
    tr.close()
    with pytest.raises(SystemExit) as info:
        convert_main(["torch-to-dcp", str(out_file), str(back)])  # exists
    assert info.value.code == 2 and "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- async
class SlowWriter(FileSystemWriter):
    """A disk that takes DELAY seconds per write (deterministic, unlike this machine's timing)."""

    DELAY = 0.3

    def write_data(self, plan, planner):
        import time

        time.sleep(self.DELAY)
        return super().write_data(plan, planner)


def test_async_save_blocks_less_and_writes_the_same_bits(tmp_path, smoke_cfg):
    args = ["train.ckpt_interval=2", "train.keep_last=10"]
    _, sync = run(smoke_cfg(tmp_path / "sync", *args), writer=SlowWriter)
    _, asyn = run(smoke_cfg(tmp_path / "async", *args, "train.async_checkpoint=true"), writer=SlowWriter)
    assert [r.step for r in sync.checkpointer.records] == [r.step for r in asyn.checkpointer.records] == [2, 4, 6, 8]
    for r in sync.checkpointer.records:
        assert r.staged_s >= SlowWriter.DELAY and r.blocked_s >= SlowWriter.DELAY
    for r in asyn.checkpointer.records:
        # save() returns once the copy is staged: well before the write could have finished.
        assert (
            r.staged_s < SlowWriter.DELAY and r.staged_bytes == r.shard_bytes == r.held_bytes > 0
        )  # one process writes all it holds
        assert r.write_s >= SlowWriter.DELAY
    for step in ("step_00000002", "step_00000004", "step_00000006", "step_00000008"):
        a = ckpt.read_logical_checkpoint(tmp_path / "async" / "checkpoints" / step)
        s = ckpt.read_logical_checkpoint(tmp_path / "sync" / "checkpoints" / step)
        assert_same_logical(a, s)
        assert a["trainer"] == s["trainer"]
    assert (tmp_path / "async" / "checkpoints" / "latest").read_text() == "step_00000008"


def test_async_save_in_flight_at_a_stop_completes_before_exit(tmp_path, smoke_cfg):
    cfg = smoke_cfg(tmp_path, "train.ckpt_interval=0", "train.exit_interval=3", "train.async_checkpoint=true")
    result, tr = run(cfg, writer=SlowWriter)
    assert result.preempted and not tr.checkpointer.in_flight
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
    ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step_00000003")
