"""Helpers shared by the test modules: `from tests.helpers import ...` (fixtures stay in the conftest files).

Config composition against the repository's conf/, the environment of a megaeff subprocess, and launching the
real CLI on one or several gloo ranks to compare runs (the end-to-end parallel tests). The multi-rank pool that
runs a function on every rank is tests/distributed/harness.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
PYTHON = sys.executable


# ---------------------------------------------------------------------------------------------------- config
def compose(overrides: Sequence[str] = ()):
    """Compose the real Hydra config (the same files users run) without the CLI: typed and validated."""
    from megaeff.config import compose as compose_config

    return compose_config(overrides, config_dir=str(CONF))


def compose_raw(overrides: Sequence[str] = ()):
    """Compose conf/config.yaml with `overrides` and return the DictConfig (errors propagate)."""
    from megaeff.config import compose_raw as _compose_raw

    return _compose_raw(overrides, config_dir=str(CONF))


# ---------------------------------------------------------------------------------------------------- CLI runs
def cli_env(**extra):
    """Environment for a megaeff subprocess: no inherited launcher variables, small thread count."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    env.update(extra)
    return env


def train(run_dir, *args, nproc=1, expect=0, launcher=None):
    """`megaeff.train` with these overrides (torchrun for nproc > 1); returns stdout + stderr."""
    if launcher is None:
        launcher = (
            [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            if nproc > 1
            else [PYTHON]
        )
    proc = subprocess.run(
        [*launcher, "-m", "megaeff.train", *args, f"run_dir={run_dir}"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def fit_on_rank(dims, overrides: Sequence[str], run_dir: str) -> int:
    """What `megaeff.train` runs on each rank, run on a RankPool rank (tests/distributed/harness.py) with the
    pool's process group and `dims`: the typed config, the world check, the Trainer to the end. The launcher's own
    behaviour (exit codes, signals, environment) is tested through the CLI; equivalence tests use this to skip a
    launcher and a fresh process per rank per run (seconds of imports each on CI's two cores)."""
    from megaeff.config.parallel import validate_world
    from megaeff.train.trainer import Trainer

    cfg = compose([*overrides, f"run_dir={run_dir}"])
    degrees = validate_world(cfg, dims.world_size)
    have = {axis: getattr(dims, axis) for axis in degrees}
    assert have == degrees, f"the pool's layout {have} is not the config's {degrees}"
    trainer = Trainer(cfg, dims, Path(run_dir))
    try:
        return trainer.fit().step
    finally:
        trainer.close()


def train_on_pool(pool, run_dir, *overrides, layout):
    """`train` on the ranks of `pool`, whose layout must be the config's (checked on the ranks)."""
    steps = pool.run(fit_on_rank, list(overrides), str(run_dir), layout=layout)
    assert len(set(steps)) == 1, steps


def records(run_dir, kind="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def final_params(run_dir):
    """The logical tensors of the latest checkpoint (any format, any layout), whole."""
    from megaeff.train.checkpoint import find_resume_dir, read_logical_checkpoint

    return read_logical_checkpoint(find_resume_dir(run_dir, "auto"))["model"]


def assert_same_run(ref_dir, run_dir, steps):
    """Per-step losses and gradient norms, validation losses and the final parameters of two runs agree."""
    import pytest
    import torch

    ref, got = records(ref_dir), records(run_dir)
    assert len(ref) == len(got) == steps
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-4)
    assert [r["val_loss"] for r in records(run_dir, "eval")] == pytest.approx(
        [r["val_loss"] for r in records(ref_dir, "eval")], rel=1e-5
    )
    ref_p, got_p = final_params(ref_dir), final_params(run_dir)
    assert ref_p.keys() == got_p.keys()
    for name in ref_p:
        a, b = ref_p[name], got_p[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(a, b), name  # index checksums: the same logical supports
