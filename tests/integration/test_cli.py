"""`megaeff-train` end to end, as a user runs it: outputs, clear errors, and stop-on-signal."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from tests.helpers import PYTHON, cli_env

pytestmark = pytest.mark.slow


def train(*overrides, cwd=None, timeout=240):
    return subprocess.run(
        [PYTHON, "-m", "megaeff.train", *overrides],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=cwd,
        timeout=timeout,
    )


def assert_clean_error(proc, *fragments):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    for frag in fragments:
        assert frag in out, out


def test_short_run_beats_unigram_baseline_and_writes_outputs(tmp_path):
    run = tmp_path / "run"
    proc = train(
        "experiment=smoke",
        f"run_dir={run}",
        "train.steps=60",
        "train.eval_interval=30",
        "train.ckpt_interval=30",
        "optim.lr=1e-2",
        "optim.warmup_steps=5",
        "model.dim=64",
        "model.ffn_dim=176",
        "train.micro_batch_size=8",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = re.search(
        r"final: step 60 \| val_loss [\d.]+ \| val_ppl ([\d.]+) \(byte-level unigram baseline ([\d.]+)\)", proc.stdout
    )
    assert final, proc.stdout
    assert float(final.group(1)) < float(final.group(2))
    png = (run / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(2, 61, 2))
    for key in (
        "loss",
        "ppl",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "step_time_s",
        "mfu",
        "mem_params_bytes",
        "mem_grads_bytes",
        "mem_optim_bytes",
    ):
        assert key in records[0], key
    # AdamW: two fp32 moments per weight plus one fp32 step counter per tensor (2 layers x 9 + 3 tensors).
    assert records[0]["mem_optim_bytes"] == 2 * records[0]["mem_params_bytes"] + 4 * 21
    assert [r["step"] for r in records if r["kind"] == "eval"] == [30, 60]
    assert (run / ".hydra/config.yaml").is_file()
    assert (run / "checkpoints/latest").read_text() == "step_00000060"
    # Where each optimizer value came from (megaeff/config/provenance.py): the command line's, else conf/optim's.
    sources = json.loads((run / "optim_sources.json").read_text())
    assert sources["lr"] == {"value": 1e-2, "source": "user"}
    assert sources["warmup_steps"] == {"value": 5, "source": "user"}
    assert sources["grad_clip"] == {"value": 1.0, "source": "optim default"}
    assert "user (command line): lr=0.01, warmup_steps=5" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("model=llama_nope", ["megaeff: error: config field 'model': no such option 'llama_nope'", "llama_60m"]),
        ("model.dimm=3", ["Key 'dimm' not in 'ModelConfig'"]),
        ("+model.dimm=3", ["megaeff: error: config field 'model.dimm': unknown key"]),
        ("train.steps=abc", ["train.steps", "abc"]),
        ("train.steps=[1,", ["megaeff: error: malformed override 'train.steps=[1,'"]),
        ("model.n_heads=3", ["config field 'model.dim'", "not divisible by model.n_heads"]),
        ("train.resume=/nonexistent/ckpt", ["megaeff: error: checkpoint '/nonexistent/ckpt': does not exist"]),
        ("data.valid_docs=[hamlett]", ["megaeff: error: data 'data.valid_docs'", "unknown plays"]),
    ],
)
def test_bad_input_gives_one_clear_message(tmp_path, override, fragments):
    proc = train("experiment=smoke", f"run_dir={tmp_path}", override)
    assert_clean_error(proc, *fragments)


@pytest.mark.parametrize(
    "overrides,field,choices",
    [
        (["parallel.cp_impl=bogus"], "parallel.cp_impl", "ring, lightseq, ulysses"),
        (["precision=fp32", "optim.name=nope"], "optim.name", "adamw, coat_adamw, galore"),
        (["model.n_heads=3"], "model.dim", None),  # a cross-field check after composition
    ],
)
def test_bad_config_is_one_line_and_exit_code_2(tmp_path, overrides, field, choices):
    """A value outside a field's choices (which Hydra would refuse in lines of its own) or a failed check: one line."""
    proc = train("experiment=smoke", f"run_dir={tmp_path}", *overrides)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"megaeff: error: config field '{field}': "), lines
    if choices:
        assert lines[0].endswith(f"must be one of {choices}; got '{overrides[-1].split('=')[1]}'"), lines


def test_corrupt_checkpoint_directory_is_reported(tmp_path):
    run = tmp_path / "run"
    assert train("experiment=smoke", f"run_dir={run}").returncode == 0
    data_files = sorted(run.glob("checkpoints/step_*/__0_0.distcp"))
    assert len(data_files) == 2  # keep_last: 2; a corrupt `latest` alone falls back (test_checkpoint_files.py)
    for data_file in data_files:  # every checkpoint: nothing to fall back to
        data_file.write_bytes(data_file.read_bytes()[:100])
    proc = train("experiment=smoke", f"run_dir={run}")
    assert_clean_error(proc, "megaeff: error: checkpoint", "no checkpoint verifies", "__0_0.distcp", "truncated")
    assert proc.returncode == 2


def test_sigterm_saves_and_exits_with_documented_code(tmp_path):
    from megaeff.errors import EXIT_PREEMPTED

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "megaeff.train",
            "experiment=smoke",
            f"run_dir={run}",
            "train.steps=100000",
            "train.ckpt_interval=0",
            "train.log_interval=1",
            "train.eval_interval=0",
            "optim.warmup_steps=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None, (
            proc.stdout.read() if proc.poll() is not None else "timeout"
        )
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out
    saved = (run / "checkpoints/latest").read_text()
    step = int(saved.split("_")[1])
    assert 1 <= step < 100000
    assert f"checkpoint saved at step {step}" in out

    resumed = train(
        "experiment=smoke",
        f"run_dir={run}",
        f"train.steps={step + 2}",
        "train.ckpt_interval=0",
        "train.log_interval=1",
        "train.eval_interval=0",
        "optim.warmup_steps=1",
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {run / 'checkpoints' / saved} at step {step}" in resumed.stdout
