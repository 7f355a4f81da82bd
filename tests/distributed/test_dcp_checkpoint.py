"""Sharded checkpoints (format 2, torch.distributed.checkpoint) on 4 gloo ranks: saved under one layout, loaded
under the same one, under one process and under another layout.

For each saving layout (tp2 x dp2 SLTrain, pp2 x dp2 with virtual stages, dp4 FSSDP with COAT FP8 states and an
asynchronous save, tp2 x cp2, expert FSSDP), on the ranks:
- a 6-step run checkpoints at step 3 (the state is captured at that save), and a second trainer on the same layout
  resumes from it: its parameters and optimizer state right after the load equal the captured ones bit for bit
  (FP8 codes as bytes), and its steps 4-6 equal the uninterrupted run's exactly;
- every rank wrote only chunks of its own boxes and no chunk was written twice (from the DCP files: each data
  item's chunk and storage length), so each rank's file is at most its shard plus per-item framing.
Then the checkpoint is loaded by one process and by another layout: each re-saves at once, and the re-saved
logical tensors equal the checkpoint's bit for bit; each then trains steps 4-6, whose losses equal the
single-process reference run's within the layout-equivalence tolerance (relative 1e-5, as tests/helpers.py's
assert_same_run; FSSDP's reduction order with COAT moves FP8 codes, so that case compares the exact state and
the same-layout continuation only)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from megaeff.errors import DiskFullError
from megaeff.train import checkpoint as ckpt
from megaeff.train.checkpoint.pieces import save_state
from tests.distributed.harness import pool_fixture
from tests.helpers import compose

pytestmark = pytest.mark.slow
pool = pool_fixture(4)

BASE = [
    "experiment=smoke",
    "train.steps=6",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.plot=false",
    "train.threads=1",
    "optim.warmup_steps=2",
    "optim.eps=1e-6",  # AdamW near a cancelling gradient amplifies reduction-order ulps (test_fssdp_training.py)
    "method.rank=8",
    "train.grad_accum=2",
    "train.keep_last=5",
]
MODELS = {
    # The same paths in every layout (measured costs differ per shard shape and per run dir).
    "sltrain": ["method=sltrain", "method.sltrain_costs=fixed"],
    "dense4": ["method=dense", "model.n_layers=4"],
    "lost_coat": ["method=lost", "precision=coat", "optim.min_fp8_numel=0", "optim.fp8_backend=torch"],
    "lowrank": ["method=lowrank"],
    "moe": ["method=lost", "model.moe_experts=4", "model.moe_aux_loss_coef=0.01"],
}
# layout -> (pool layout, overrides): every one the global batch of one process with micro 4 x accum 2.
LAYOUTS = {
    "tp2_dp2": (dict(tp=2, dp=2), ["parallel=tp2_dp2", "train.micro_batch_size=2"]),
    "pp2_dp2_virtual": (
        dict(pp=2, dp=2),
        [
            "parallel.pp=2",
            "parallel.dp=2",
            "parallel.pp_schedule=interleaved",
            "parallel.pp_virtual=2",
            "train.micro_batch_size=2",
        ],
    ),
    "fssdp_dp4": (dict(dp=4), ["parallel.dp=4", "parallel.dp_impl=fssdp", "train.micro_batch_size=1"]),
    "tp2_cp2": (dict(tp=2, cp=2), ["parallel=tp2_cp2", "train.micro_batch_size=4"]),
    "dp4_experts_fssdp": (dict(dp=4), ["parallel.dp=4", "parallel.expert_impl=fssdp", "train.micro_batch_size=1"]),
    "dp4_experts_ep": (dict(dp=4), ["parallel.dp=4", "parallel.expert_impl=ep", "train.micro_batch_size=1"]),
    "pp2_dp2": (dict(pp=2, dp=2), ["parallel.pp=2", "parallel.dp=2", "train.micro_batch_size=2"]),
    "cp2_dp2": (dict(cp=2, dp=2), ["parallel=cp2_dp2", "train.micro_batch_size=2"]),
}
SINGLE = ["train.micro_batch_size=4"]
# saving layout -> (model, extra overrides of the save, the other layout it is loaded into, compare losses)
CASES = {
    "tp2_dp2": ("sltrain", [], "fssdp_dp4", True),
    "pp2_dp2_virtual": ("dense4", [], "tp2_dp2", True),
    "fssdp_dp4": ("lost_coat", ["train.async_checkpoint=true"], "pp2_dp2", False),
    "tp2_cp2": ("lowrank", [], "cp2_dp2", True),
    "dp4_experts_fssdp": ("moe", [], "dp4_experts_ep", True),
}
REL = 1e-5  # tests/helpers.py assert_same_run: the layout-equivalence tolerance of per-step losses


def portable(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t).clone()


def snapshot(tr) -> Dict:
    """This rank's parameters, buffers and optimizer state (FP8 as bytes)."""
    optim = ckpt.optimizer_state_by_name(tr.model, tr.optimizer)["state"]
    return dict(
        model={k: portable(v) for k, v in tr.model.state_dict().items()},
        optim={n: {k: portable(v) for k, v in st.items()} for n, st in optim.items()},
    )


def equal_states(a: Dict, b: Dict) -> List[str]:
    """Names that differ (dtype or any bit) between two snapshots."""
    bad = [
        k
        for k in a["model"]
        if not (a["model"][k].dtype == b["model"][k].dtype and torch.equal(a["model"][k], b["model"][k]))
    ]
    if a["optim"].keys() != b["optim"].keys():
        return bad + ["optimizer state keys"]
    for n, st in a["optim"].items():
        bad += [f"{n}/{k}" for k, v in st.items() if not torch.equal(v, b["optim"][n][k])]
    return bad


def config(run_dir, *overrides):
    return compose([*BASE, f"run_dir={run_dir}", *overrides])


# ----------------------------------------------------------------------------------------------- on the ranks
def save_then_resume(dims, overrides: List[str], run_dir: str) -> Dict:
    """An uninterrupted 6-step run that checkpoints at step 3 (state captured at the save), then a second trainer
    on this layout resuming from that checkpoint: its state at load, and its steps 4-6."""
    from megaeff.train.trainer import Trainer

    first = Trainer(config(run_dir, "train.ckpt_interval=3", *overrides), dims, Path(run_dir))
    captured = {}
    save = first.save

    def save_and_capture():
        path = save()
        if first.step == 3:
            captured.update(snapshot(first), boxes=_boxes(first))
        return path

    first.save = save_and_capture
    losses = first.fit().losses
    first.close()
    (record,) = [r for r in first.checkpointer.records if r.step == 3]
    captured["boxes"].update(written_bytes=record.shard_bytes, staged_bytes=record.staged_bytes)
    resume = Path(run_dir) / "checkpoints" / "step_00000003"
    second = Trainer(config(f"{run_dir}_again", f"train.resume={resume}", *overrides), dims, Path(f"{run_dir}_again"))
    differ = equal_states({k: captured[k] for k in ("model", "optim")}, snapshot(second))
    again = second.fit().losses
    second.close()
    return dict(losses=losses, again=again, differ=differ, boxes=captured["boxes"], rank=dims.rank)


def _boxes(tr) -> Dict:
    """fqn -> [(offsets, sizes, bytes)] of the chunks this rank holds (what `local_pieces` says), and, counted
    without it, the bytes of this rank's own tensors: its state dict and optimizer state."""
    state = save_state(tr.model, tr.optimizer, tr.parallel.state)
    boxes = {
        fqn: [(tuple(off), tuple(v.shape), v.numel() * v.element_size()) for off, v in t.chunks]
        for fqn, t in state.items()
    }
    tensors = [*tr.model.state_dict().values()] + [v for st in tr.optimizer.state.values() for v in st.values()]
    # Tensors with no box form are gathered and offered whole (SLTrain's row-parallel sparse values).
    logical, fallback = tr.parallel.state, 0
    entries = [(n, "", t) for n, t in tr.model.state_dict().items()] + [
        (n, k, v)
        for n, st in ckpt.optimizer_state_by_name(tr.model, tr.optimizer)["state"].items()
        for k, v in st.items()
    ]
    for name, key, t in entries:
        if logical.local_pieces(name, key, t) is None:
            fallback += state[f"optim/{name}/{key}" if key else f"model/{name}"].local_bytes
    local = sum(t.numel() * t.element_size() for t in tensors)
    return dict(boxes=boxes, local_bytes=local, fallback_bytes=fallback)


def load_resave_continue(dims, overrides: List[str], run_dir: str, resume: str) -> Dict:
    """Load `resume` under this layout, save at once (the re-save), then train to the end."""
    from megaeff.train.trainer import Trainer

    tr = Trainer(config(run_dir, f"train.resume={resume}", "train.ckpt_interval=0", *overrides), dims, Path(run_dir))
    tr.save()
    losses = tr.fit().losses
    tr.close()
    return dict(losses=losses)


# ----------------------------------------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run of each model (losses of steps 1-6), once per module."""
    runs = {}

    def get(model):
        if model not in runs:
            runs[model] = in_process(tmp_path_factory.mktemp(f"single_{model}") / "run", *MODELS[model])
        return runs[model]

    return get


def in_process(run_dir, *overrides, resave=False) -> List[float]:
    from megaeff.distributed.dims import ParallelDims
    from megaeff.train.trainer import Trainer

    cfg = config(run_dir, *SINGLE, "train.ckpt_interval=0", *overrides)
    tr = Trainer(cfg, ParallelDims.from_config(cfg.parallel, world_size=1), Path(run_dir))
    if resave:
        tr.save()
    losses = tr.fit().losses
    tr.close()
    return losses


def bits(t):
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def assert_same_logical(a: Dict, b: Dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert v.dtype == b["model"][k].dtype and torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for n, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            w = b["optimizer"]["state"][n][k]
            assert v.dtype == w.dtype and torch.equal(bits(v), bits(w)), (n, k)
    assert a["optimizer"]["hparams"] == b["optimizer"]["hparams"]
    assert a["trainer"]["step"] == b["trainer"]["step"] and a["trainer"]["scheduler"] == b["trainer"]["scheduler"]


def check_bytes_per_rank(path: Path, boxes_by_rank: List[Dict]) -> None:
    """Each rank's data file holds only chunks of its own boxes, every chunk of the checkpoint is written once,
    and the file is its chunks' bytes plus per-item framing (torch.save's zip headers around each chunk)."""
    md = ckpt.read_metadata(path)
    written: Dict[str, list] = {}
    for index, info in md.storage_data.items():
        item = md.state_dict_metadata[index.fqn]
        chunk = item.chunks[index.index]
        raw = chunk.sizes.numel() * item.properties.dtype.itemsize
        written.setdefault(info.relative_path, []).append(
            (index.fqn, tuple(chunk.offsets), tuple(chunk.sizes), raw, info.length)
        )
    total_logical = sum(v.size.numel() * v.properties.dtype.itemsize for v in md.state_dict_metadata.values())
    assert sum(raw for items in written.values() for *_, raw, _ in items) == total_logical  # nothing twice
    for rank, held in enumerate(boxes_by_rank):
        items = written.get(f"__{rank}_0.distcp", [])
        mine = {(fqn, off, size) for fqn, chunks in held["boxes"].items() for off, size, _ in chunks}
        assert all((fqn, off, size) in mine for fqn, off, size, _, _ in items), f"rank {rank} wrote another's chunk"
        raw = sum(r for *_, r, _ in items)
        assert raw <= sum(b for chunks in held["boxes"].values() for *_, b in chunks)
        assert raw == held["written_bytes"]  # what the writer assignment gave it (a replica writes once)
        assert held["staged_bytes"] in (0, raw)  # an asynchronous save staged exactly that
        # Never more than it holds (plus what it gathered because it has no box form).
        assert raw <= held["local_bytes"] + held["fallback_bytes"], (rank, raw, held)
        # torch.save frames each chunk in a small zip archive: 1573-1577 bytes measured here, whatever its size.
        size = (path / f"__{rank}_0.distcp").stat().st_size if items else 0
        assert raw <= size <= raw + 2048 * len(items), (rank, raw, size, len(items))


@pytest.mark.parametrize("layout", list(CASES))
def test_checkpoint_moves_between_layouts(pool, tmp_path, reference, layout):
    model, extra, other, compare_losses = CASES[layout]
    shape, overrides = LAYOUTS[layout]
    args = [*MODELS[model], *overrides, *extra]
    out = pool.run(save_then_resume, args, str(tmp_path / "run"), layout=shape, timeout=300)
    path = tmp_path / "run" / "checkpoints" / "step_00000003"
    for res in out:
        assert res["differ"] == [], (res["rank"], res["differ"][:5])  # same layout: bit-identical state at load
        assert res["again"] == res["losses"][3:]  # and the same steps after it, exactly
    check_bytes_per_rank(path, [res["boxes"] for res in out])
    saved = ckpt.read_logical_checkpoint(path)

    single = in_process(tmp_path / "single", *MODELS[model], f"train.resume={path}", resave=True)
    assert_same_logical(ckpt.read_logical_checkpoint(tmp_path / "single" / "checkpoints" / "step_00000003"), saved)
    other_shape, other_overrides = LAYOUTS[other]
    moved = pool.run(
        load_resave_continue,
        [*MODELS[model], *other_overrides],
        str(tmp_path / "other"),
        str(path),
        layout=other_shape,
        timeout=300,
    )
    assert_same_logical(ckpt.read_logical_checkpoint(tmp_path / "other" / "checkpoints" / "step_00000003"), saved)
    if compare_losses:
        ref = reference(model)
        assert out[0]["losses"] == pytest.approx(ref, rel=REL)
        assert single == pytest.approx(ref[3:], rel=REL)
        assert moved[0]["losses"] == pytest.approx(ref[3:], rel=REL)


# ----------------------------------------------------------------------------------------------- failures
class FullOnRank1(FileSystemWriter):
    """Rank 1's disk is full (the other ranks write normally)."""

    def write_data(self, plan, planner):
        if torch.distributed.get_rank() == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(self.path) / "__1_0.distcp"))
        return super().write_data(plan, planner)


def disk_full_on_one_rank(dims, root: str) -> Dict:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    kw = dict(
        model=model,
        optimizer=opt,
        trainer_state={"step": 0},
        config_yaml="",
        rank=dims.rank,
        world_size=dims.world_size,
        keep_last=3,
    )
    ckpt.save_checkpoint(Path(root), 1, **kw)
    try:
        ckpt.save_checkpoint(Path(root), 2, writer=FullOnRank1, **kw)
    except DiskFullError as exc:
        return dict(error=str(exc))
    return dict(error=None)


def test_disk_full_on_one_rank_fails_every_rank_and_loses_nothing(pool, tmp_path):
    out = pool.run(disk_full_on_one_rank, str(tmp_path / "ckpt"), layout=dict(dp=4))
    message = f"no space left on device while writing {tmp_path / 'ckpt' / '.tmp-step_00000002' / '__1_0.distcp'}"
    assert [r["error"] for r in out] == [message] * 4
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000001"
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()] == ["step_00000001"]
    ckpt.verify_checkpoint(tmp_path / "ckpt" / "step_00000001")
