"""tools/gpu_check.py's CPU-side logic: without CUDA every CUDA step is skipped with its reason printed and the JSON
report is written; with a (faked) CUDA environment the plan, the stop at the first hard failure and the parsing of
pytest's and the trainer's outputs. Nothing is installed and no subprocess runs."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["gpu_check"]


def fake_cuda_env(gc, monkeypatch):
    env = {
        "torch": "2.13.0+cu128",
        "torch_cuda": "12.8",
        "cuda_available": True,
        "device": "NVIDIA H100",
        "capability": [9, 0],
        "nvcc": "/usr/local/cuda/bin/nvcc",
        "nvidia_device": True,
    }
    monkeypatch.setattr(gc, "torch_environment", lambda: dict(env))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path; this machine has CUDA")
def test_without_cuda_every_cuda_step_is_skipped_with_its_reason(gc, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert gc.main(["--no-install", "--out", str(out)]) == 2
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["environment"]["status"] == "passed"
    assert report["environment"]["torch"] == torch.__version__ and not report["environment"]["cuda_available"]
    for name, s in steps.items():
        if name != "environment":
            assert s["status"] == "skipped" and s["reason"].startswith("no CUDA device"), name
            assert f"{name}: skipped (no CUDA device" in printed  # the reason is printed, not only stored
    assert {"tests:fp8_adamw", "tests:scaled_mm", "tests:flash_attention", "throughput"} <= set(steps)
    assert "NOT CHECKED: no CUDA device" in printed
    assert report["first_failure"] is None


def test_dry_run_on_a_cuda_machine_plans_every_phase(gc, tmp_path, monkeypatch, capsys):
    fake_cuda_env(gc, monkeypatch)
    out = tmp_path / "report.json"
    assert gc.main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    phases = [s for s in report["steps"] if s["name"].startswith("tests:")]
    assert len(phases) == len(gc.PHASES)
    assert all(s["status"] == "skipped" and s["reason"] == "dry run" and s["details"]["pytest"] for s in phases)


def test_the_first_hard_failure_stops_the_check(gc, tmp_path, monkeypatch, capsys):
    fake_cuda_env(gc, monkeypatch)
    ran = []

    def build(step, env, timeout):
        step.status = "passed"

    def phase(step, args, timeout, strict, workdir):
        ran.append(step.name)
        assert 0 < timeout <= 600  # the 10-minute budget of the test phases
        if step.name == "tests:scaled_mm":
            raise gc.HardFailure("scaled_mm: test_x failed")
        step.status = "passed"

    monkeypatch.setattr(gc, "build_csrc", build)
    monkeypatch.setattr(gc, "pytest_phase", phase)
    out = tmp_path / "report.json"
    assert gc.main(["--no-install", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert ran == ["tests:fp8_adamw_unit", "tests:fp8_adamw", "tests:scaled_mm"]
    assert report["first_failure"] == "tests:scaled_mm" and status["tests:scaled_mm"] == "failed"
    assert status["tests:flash_attention"] == status["throughput"] == "not run"
    assert "FAILED at tests:scaled_mm" in capsys.readouterr().out


def test_junit_summary_counts_failures_and_skip_reasons(gc, tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="m" name="a"/>'
        '<testcase classname="m" name="b"><skipped message="flash_attn is not installed"/></testcase>'
        '<testcase classname="m" name="c"><failure message="assert 1 == 2"/></testcase></testsuite></testsuites>'
    )
    s = gc.junit_summary(xml)
    assert (s["passed"], s["skipped"], s["failed"]) == (1, 1, 1)
    assert s["skips"] == ["m::b: flash_attn is not installed"] and s["failures"] == ["m::c: assert 1 == 2"]


def test_last_train_record_survives_a_line_cut_by_the_kill(gc, tmp_path):
    lines = [{"kind": "train", "step": 10, "tokens_per_s": 1.0}, {"kind": "eval", "step": 10}]
    lines += [{"kind": "train", "step": 20, "tokens_per_s": 2.0, "mfu": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tr')
    assert gc.last_train_record(tmp_path)["step"] == 20
    assert gc.last_train_record(tmp_path / "missing") is None


def test_every_gpu_test_belongs_to_exactly_one_named_phase(gc):
    """tests/gpu is selected by -k per phase; a test no phase names would only run in other_cuda_tests."""
    names = [
        n.name
        for n in ast.parse((REPO / "tests" / "gpu" / "test_accelerators.py").read_text()).body
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    ]
    keys = [args[-1] for name, args in gc.PHASES if args[0] == "tests/gpu"] + ["flash"]
    for name in names:
        assert sum(k in name for k in keys) == 1, name


def test_a_throughput_run_is_timed_from_its_first_log_and_then_killed(gc, tmp_path):
    """A stand-in trainer (no torch: starts in a fraction of a second) logs one window, then would run forever."""
    record = json.dumps({"kind": "train", "step": 10}) + "\n"
    script = (
        "import pathlib, time; time.sleep(0.5); "
        f"pathlib.Path({str(tmp_path)!r}, 'metrics.jsonl').write_text({record!r}); time.sleep(600)"
    )
    t0 = time.monotonic()
    rc = gc.train_for([sys.executable, "-c", script], tmp_path, seconds=1.0, startup_s=60)
    elapsed = time.monotonic() - t0
    assert rc == -9 and 1.4 <= elapsed < 30  # 0.5 s of startup + 1 s of training, then the kill
    assert gc.last_train_record(tmp_path)["step"] == 10
    # Nothing logged within the startup allowance: killed as well, and the caller reports no record.
    assert gc.train_for([sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "x", 1.0, 1.0) == -9
