"""Issue 18's reproductions end to end: non-finite losses, overrides on resume, a locked run directory, and bad
input that must end in one `megaeff: error:` line instead of a traceback (docs/reliability.md lists them all)."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from megaeff.distributed.dims import ParallelDims
from megaeff.errors import EXIT_NONFINITE, EXIT_USAGE, CheckpointError, NonFiniteError
from megaeff.optim.schedule import lr_multiplier
from megaeff.train.checkpoint import complete_checkpoints, read_logical_checkpoint
from megaeff.train.trainer import Trainer
from tests.helpers import PYTHON, cli_env, records

pytestmark = pytest.mark.slow


def cli(*args, timeout=240, **env):
    """`megaeff-train` as a user types it."""
    return subprocess.run(
        [PYTHON, "-m", "megaeff.train", *args], capture_output=True, text=True, env=cli_env(**env), timeout=timeout
    )


def one_clear_error(proc, code=EXIT_USAGE) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("megaeff: error: ")]
    assert len(errors) == 1, out
    return errors[0]


def make_trainer(cfg):
    return Trainer(cfg, ParallelDims.from_config(cfg.parallel, world_size=1), Path(cfg.run_dir))


# ----------------------------------------------------------------------------- item 1: NaN / inf
def test_diverging_run_stops_without_saving_the_bad_state(tmp_path):
    """The issue's reproduction: lr=1e6 went NaN at step 3-4, ran to the end, exited 0, and pruning kept only
    non-finite checkpoints. Now: exit EXIT_NONFINITE naming the step; every kept checkpoint is finite."""
    run = tmp_path / "a"
    proc = cli("experiment=smoke", f"run_dir={run}", "optim.lr=1e6", "train.ckpt_interval=1", "train.keep_last=2")
    line = one_clear_error(proc, EXIT_NONFINITE)
    step = int(line.split("step ")[1].split(":")[0])
    assert "non-finite" in line and 1 < step < 8, line
    kept = complete_checkpoints(run / "checkpoints")
    assert kept and int(kept[-1].name.split("_")[1]) == step - 1  # the last finite step, nothing after it
    assert (run / "checkpoints/latest").read_text().strip() == kept[-1].name
    for ckpt in kept:
        state = read_logical_checkpoint(ckpt)
        tensors = list(state["model"].values()) + [
            v for s in state["optimizer"]["state"].values() for v in s.values() if v.is_floating_point()
        ]
        assert all(bool(torch.isfinite(t).all()) for t in tensors), ckpt


def test_skip_drops_the_update_counts_it_and_stops_after_k(tmp_path, smoke_cfg):
    """train.nonfinite=skip: a step with a NaN gradient leaves parameters, optimizer state and LR schedule as
    they were (the data position moves on), `nonfinite_skips` counts it; K in a row stop the run unsaved."""
    cfg = smoke_cfg(tmp_path / "s", "train.nonfinite=skip", "train.nonfinite_max_consecutive=2", "train.log_interval=1")
    tr = make_trainer(cfg)
    poison = {"on": False}
    first = next(tr.model.parameters())
    first.register_hook(lambda g: g * math.nan if poison["on"] else g)  # the test's fault injection
    tr.train_step()
    params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    moments = {p: s["exp_avg"].clone() for p, s in tr.optimizer.state.items()}
    lr_step = tr.scheduler.step_count
    poison["on"] = True
    m = tr.train_step()
    assert math.isnan(m["grad_norm"]) and tr.step == 2 and tr.nonfinite.skipped == 1
    assert tr.scheduler.step_count == lr_step and tr.consumed_samples == 2 * tr.global_batch_size
    assert all(torch.equal(p, params[n]) for n, p in tr.model.named_parameters())
    assert all(torch.equal(s["exp_avg"], moments[p]) for p, s in tr.optimizer.state.items())
    poison["on"] = False
    tr.fit()  # steps 3..8 apply their updates again
    assert not all(torch.equal(p, params[n]) for n, p in tr.model.named_parameters())
    assert [r["nonfinite_skips"] for r in records(tmp_path / "s")] == [1] * 6
    tr.close()

    stuck = make_trainer(smoke_cfg(tmp_path / "k", "train.nonfinite=skip", "train.nonfinite_max_consecutive=2"))
    with torch.no_grad():
        next(stuck.model.parameters()).fill_(math.nan)  # every step from now on is non-finite
    with pytest.raises(NonFiniteError, match="step 2: .* 2 steps in a row"):
        stuck.fit()
    stuck.close()
    assert not complete_checkpoints(tmp_path / "k/checkpoints")


# ----------------------------------------------------------------------------- item 3: overrides on resume
def test_resume_honours_a_new_learning_rate_and_logs_every_difference(tmp_path, smoke_cfg, capsys):
    """The checkpoint's param groups (initial_lr included) used to overwrite optim.lr: the losses stayed those of
    the old LR while the next checkpoint's config.yaml recorded the new one."""
    first = make_trainer(smoke_cfg(tmp_path / "run", "train.exit_interval=4"))
    first.fit()
    first.close()
    shutil.copytree(tmp_path / "run", tmp_path / "same")
    same = make_trainer(smoke_cfg(tmp_path / "same"))
    same_losses = same.fit().losses
    same.close()

    capsys.readouterr()
    new = make_trainer(smoke_cfg(tmp_path / "run", "optim.lr=3e-2", "train.steps=10"))
    out = capsys.readouterr().out
    assert "optim.lr: 0.003 -> 0.03 (honour" in out and "train.steps: 8 -> 10 (allow" in out
    assert "train.exit_interval: 4 -> 0 (allow" in out
    group = new.optimizer.param_groups[0]
    assert group["initial_lr"] == 3e-2
    assert group["lr"] == pytest.approx(3e-2 * lr_multiplier(4, 10, 2, 0.1))  # the new schedule, from step 4
    losses = new.fit().losses
    new.close()
    assert losses[:4] != same_losses  # the new LR ran
    saved = read_logical_checkpoint(complete_checkpoints(tmp_path / "run/checkpoints")[-1])
    assert "lr: 0.03" in saved["config_yaml"]
    assert saved["optimizer"]["hparams"][0]["initial_lr"] == 3e-2  # the record is what ran


@pytest.mark.parametrize(
    "override,named", [("train.seed=7", "train.seed: 1234 -> 7"), ("model.n_kv_heads=1", "model.n_kv_heads")]
)
def test_resume_refuses_what_cannot_change(tmp_path, smoke_cfg, override, named):
    first = make_trainer(smoke_cfg(tmp_path, "train.exit_interval=4"))
    first.fit()
    first.close()
    with pytest.raises(CheckpointError, match="a resume cannot change") as exc:
        make_trainer(smoke_cfg(tmp_path, override))
    assert named in str(exc.value)


# ----------------------------------------------------------------------------- item 6: one run per run_dir
def test_second_run_in_a_run_dir_fails_naming_the_holder(tmp_path):
    """Two megaeff-train processes in one run_dir: the second fails at once, naming the first's host and PID,
    before Hydra rewrites the first's .hydra/ files."""
    run = tmp_path / "run"
    first = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "megaeff.train",
            "experiment=smoke",
            f"run_dir={run}",
            "train.steps=100000",
            "train.ckpt_interval=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        hydra_config = (run / ".hydra/config.yaml").read_text()
        line = one_clear_error(cli("experiment=smoke", f"run_dir={run}", "optim.lr=5e-3"))
        assert "is in use by another run" in line and f"pid {first.pid}" in line and "host " in line, line
        assert (run / ".hydra/config.yaml").read_text() == hydra_config
    finally:
        first.kill()
        first.wait()


# ----------------------------------------------------------------------------- tracebacks -> one clear error
@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["optim.lr=nan"], "config field 'optim.lr': must be a positive finite number, got nan"),
        (["train.device=foo"], "config field 'train.device'"),
        (["precision=coat", "optim.fp8_backend=cuda"], "config field 'optim.fp8_backend'"),
        (["experiment=smok", "--cfg", "job"], "config field 'experiment': no such option 'smok'"),
        (["data.cache_dir={file}/cache"], "cannot create this cache directory: Not a directory"),
        (["run_dir={file}"], "config field 'run_dir': {file} exists and is not a directory"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, overrides, fragment):
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    fill = {"file": file}
    args = ["experiment=smoke", f"run_dir={tmp_path / 'run'}", *(o.format(**fill) for o in overrides)]
    assert fragment.format(**fill) in one_clear_error(cli(*args))


def test_shortened_preset_runs_with_a_warning_and_no_secret_reaches_the_run_dir(tmp_path):
    """`train.steps` below the experiment's warmup used to be refused; the preset's warmup now gives way. The same
    run checks a case that held already: credentials in the environment are written nowhere in the run dir."""
    secret = "megaeff-test-secret-8c1f"
    proc = cli("experiment=smoke", f"run_dir={tmp_path}", "train.steps=1", WANDB_API_KEY=secret, HF_TOKEN=secret)
    assert proc.returncode == 0, proc.stderr
    assert "megaeff: warning: optim.warmup_steps=2 (from the config files" in proc.stderr
    # The same value typed on the command line is refused: tests/unit/test_config.py.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5 and not [p for p in files if secret.encode() in p.read_bytes()]


def test_kill_9_in_the_middle_of_a_save_leaves_a_loadable_latest(tmp_path):
    """A case that held already (a crash at any moment of a save): SIGKILL the moment a `.tmp-` checkpoint
    directory appears; `latest` still names a complete checkpoint and the rerun resumes from it."""
    run = tmp_path / "run"
    args = ["experiment=smoke", f"run_dir={run}", "train.steps=100000", "train.ckpt_interval=1", "train.keep_last=2"]
    proc = subprocess.Popen([PYTHON, "-m", "megaeff.train", *args], stdout=subprocess.DEVNULL, env=cli_env())
    root = run / "checkpoints"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (root / "latest").is_file() and any(p.name.startswith(".tmp-") for p in root.iterdir()):
                break
            time.sleep(0.002)
        proc.kill()  # SIGKILL: no handler, no cleanup
        assert proc.wait() == -9
    finally:
        proc.kill()
    assert any(p.name.startswith(".tmp-") for p in root.iterdir()), "the kill did not land inside a save"
    latest = (root / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    rerun = cli("experiment=smoke", f"run_dir={run}", f"train.steps={step + 1}", "train.plot=false")
    assert rerun.returncode == 0, rerun.stderr
    assert f"at step {step}" in rerun.stdout and "resumed from" in rerun.stdout
