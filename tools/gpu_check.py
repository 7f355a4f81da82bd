#!/usr/bin/env python
"""The GPU check: everything in megaeff that only runs on CUDA, in one command on one CUDA machine.

    bash tools/gpu_check.sh [--out gpu_check.json] [--no-install] [--dry-run] [--budget-s 600] [--strict]

Steps, in order; the first hard failure stops the check (later steps are recorded as not run):
1. environment: torch, its CUDA, the device (no CUDA device: every later step is skipped with that reason, exit 2);
2. install (pip only; --no-install skips it): a CUDA torch build when torch has none, Triton and flash-attn when
   absent. apex cannot come from pip (the PyPI "apex" is another project): the NGC image of docker/Dockerfile
   ships it. A failed install is a warning: the tests that need the package are then skipped, with the reason;
3. build: the csrc FP8 AdamW extension (`MEGAEFF_BUILD_CSRC=1 python setup.py build_ext --inplace`) unless it is
   already importable; hard failure when nvcc is there and the build fails;
4. tests (pytest, stop at the first failure), within --budget-s all together:
   fp8_adamw (CUDA and Triton kernels bit-exact against the reference), scaled_mm (`_scaled_mm` GEMMs), flash
   attention (tests marked `cuda` whose name holds "flash"), cp_blocks (the CUDA cases of the CP flash block
   tests), apex, compile, then every other test marked `cuda`. A CUDA test skipped on a CUDA machine means a
   missing package: listed with its reason, and a failure under --strict;
5. throughput: megaeff-train on llama_60m and llama_350m, bf16 with and without COAT (precision=bf16 |
   coat_bf16), each training for its share of --throughput-s once it logs (startup excluded, up to --startup-s),
   then killed; tokens/s, MFU and peak memory of the last 10-step window of the run's metrics.jsonl.

The report (JSON, --out) holds every step: status (passed | failed | skipped | warning | not run), seconds, the
reason, and details (pytest counts and skip reasons, throughput numbers, the backend report of each run).
Exit status: 0 no hard failure, 1 a hard failure, 2 no CUDA device (nothing checked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
# pytest phases: (name, pytest arguments). Selected by path, -k and the `cuda` marker (pytest.ini).
KNOWN = "flash or apex or scaled_mm or fp8_adamw or compile"
PHASES = [
    # -k matches markers too: "cuda" would select every test of tests/gpu (all marked), so those go by name.
    (
        "fp8_adamw_unit",
        ["tests/unit/test_fp8_adamw_kernels.py", "tests/unit/test_fp8_adamw_triton.py", "-k", "cuda or nvcc"],
    ),
    ("fp8_adamw", ["tests/gpu", "-k", "fp8_adamw"]),
    ("scaled_mm", ["tests/gpu", "-k", "scaled_mm"]),
    ("flash_attention", ["tests", "-m", "cuda", "-k", "flash"]),
    # The CP block kernels' own tests (issue 21 part 1), whichever of their CUDA cases are marked or named cuda.
    ("cp_blocks", ["tests/distributed/test_cp_blocks.py", "-k", "cuda"]),
    ("apex", ["tests/gpu", "-k", "apex"]),
    ("compile", ["tests/gpu", "-k", "compile"]),
    ("other_cuda_tests", ["tests", "-m", "cuda", "-k", f"not ({KNOWN})"]),
]
THROUGHPUT_MODELS = ("llama_60m", "llama_350m")
THROUGHPUT_PRECISIONS = ("bf16", "coat_bf16")


@dataclass
class Step:
    name: str
    status: str = "not run"  # passed | failed | skipped | warning | not run
    seconds: float = 0.0
    reason: str = ""
    details: Dict = field(default_factory=dict)


class HardFailure(Exception):
    pass


def log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


def run(cmd: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run with output streamed to our stdout; a timeout kills the whole process group."""
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(list(cmd), cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = -signal.SIGKILL
    return subprocess.CompletedProcess(list(cmd), rc)


# ----------------------------------------------------------------------------------------------- environment
def torch_environment() -> Dict:
    """torch, CUDA and nvcc as this process sees them."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else None,
        "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
        "nvcc": shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None),
        "nvidia_device": Path("/dev/nvidia0").exists() or bool(shutil.which("nvidia-smi")),
    }


def environment(in_process: bool) -> Dict:
    """In a subprocess after installs (this process's torch would be the old one), in process otherwise (fast)."""
    if in_process:
        return torch_environment()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--print-environment"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    if out.returncode:
        raise HardFailure(f"torch does not import: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def importable(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True).returncode == 0


# ---------------------------------------------------------------------------------------------------- install
def pip_install(args: List[str], timeout: float) -> str:
    """'' on success, else why not."""
    res = run([sys.executable, "-m", "pip", "install", *args], timeout)
    return "" if res.returncode == 0 else f"pip install {' '.join(args)} failed (exit {res.returncode})"


def install(step: Step, env: Dict, timeout: float) -> Dict:
    """Soft: a failure is a warning (the dependent tests then skip with the reason). Returns the new environment."""
    problems, done = [], []
    if not env["torch_cuda"]:
        version = env["torch"].split("+")[0]
        why = pip_install([f"torch=={version}", "--index-url", TORCH_CUDA_INDEX], timeout)
        (problems if why else done).append(why or f"torch {version} (CUDA build)")
    for module, spec, extra in (
        ("triton", "triton>=3.0", []),
        ("flash_attn", "flash-attn>=2.5", ["--no-build-isolation"]),
    ):
        if importable(module):
            continue
        why = pip_install([*extra, spec], timeout)
        (problems if why else done).append(why or spec)
    if not importable("apex"):
        problems.append("apex is not installed and pip cannot provide it (use the NGC image: docker/Dockerfile)")
    step.details = {"installed": done, "problems": problems}
    step.status, step.reason = ("warning", "; ".join(problems)) if problems else ("passed", "")
    return environment(in_process=False) if done else env


def build_csrc(step: Step, env: Dict, timeout: float) -> None:
    if importable("megaeff._fp8_adamw_cuda"):
        step.status, step.reason = "passed", "megaeff._fp8_adamw_cuda already built"
        return
    if not env["nvcc"] or not Path(env["nvcc"]).exists():
        step.status, step.reason = "skipped", "nvcc not found (set CUDA_HOME): the CUDA FP8 AdamW tests JIT-skip too"
        return
    res = run([sys.executable, "setup.py", "build_ext", "--inplace"], timeout, env={"MEGAEFF_BUILD_CSRC": "1"})
    if res.returncode != 0 or not importable("megaeff._fp8_adamw_cuda"):
        raise HardFailure(f"building the csrc extension failed (exit {res.returncode})")
    step.status = "passed"


# ------------------------------------------------------------------------------------------------------ tests
def junit_summary(path: Path) -> Dict:
    """Counts, failures and skip reasons from pytest's JUnit XML."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
    if not path.is_file():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append(f"{name}: {(bad.get('message') or '')[:300]}")
        elif skip is not None:
            out["skipped"] += 1
            out["skips"].append(f"{name}: {skip.get('message') or ''}")
        else:
            out["passed"] += 1
    return out


def pytest_phase(step: Step, args: List[str], timeout: float, strict: bool, workdir: Path) -> None:
    paths = [a for a in args if a.startswith("tests/")]
    if paths and not any((REPO / a.split("::")[0]).exists() for a in paths):
        step.status, step.reason = "skipped", f"not in this checkout: {', '.join(paths)}"
        return
    xml = workdir / f"{step.name}.xml"
    cmd = [sys.executable, "-m", "pytest", *args, "-x", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    res = run(cmd, timeout)
    summary = junit_summary(xml)
    step.details = summary
    if res.returncode == -signal.SIGKILL:
        raise HardFailure(f"{step.name}: over its time budget ({timeout:.0f} s left of --budget-s)")
    if res.returncode == 5:  # no test selected
        step.status, step.reason = "skipped", "no test selected"
        return
    if res.returncode != 0:
        first = summary["failures"][0] if summary["failures"] else f"pytest exit {res.returncode}"
        raise HardFailure(f"{step.name}: {first}")
    step.status = "passed"
    if summary["skipped"]:
        step.reason = f"{summary['skipped']} CUDA test(s) skipped on a CUDA machine: " + "; ".join(summary["skips"][:5])
        if strict:
            raise HardFailure(f"{step.name}: {step.reason} (--strict)")
        step.status = "warning"


# ------------------------------------------------------------------------------------------------ throughput
def last_train_record(run_dir: Path) -> Optional[Dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # the line the kill cut short
    train = [r for r in records if isinstance(r, dict) and r.get("kind") == "train"]
    return train[-1] if train else None


def train_for(cmd: List[str], run_dir: Path, seconds: float, startup_s: float) -> int:
    """Run a training command until it has trained `seconds` past its first logged window (startup, imports and
    data excluded, up to `startup_s`), then kill it (SIGKILL: no checkpoint is wanted). Its exit status, or
    -SIGKILL when it was stopped here."""
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    t0, first = time.monotonic(), None
    while proc.poll() is None:
        time.sleep(0.5)
        now = time.monotonic()
        if first is None and last_train_record(run_dir) is not None:
            first = now
        if (first is not None and now - first >= seconds) or (first is None and now - t0 >= startup_s):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -signal.SIGKILL
    return proc.returncode


def throughput_run(model: str, precision: str, seconds: float, args: argparse.Namespace, workdir: Path) -> Dict:
    """One training run, `seconds` long once it logs (a run that reaches --max-steps first ends normally); the
    numbers of its last logged window of 10 steps, past the first steps' warm-up."""
    run_dir = workdir / f"{model}-{precision}"
    overrides = [
        f"model={model}",
        f"precision={precision}",
        f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch}",
        # More steps than a slice lasts (the data index is sized by steps x batch: keep it modest).
        f"train.steps={args.max_steps}",
        "train.eval_max_batches=2",
        "train.log_interval=10",
        "train.eval_interval=0",
        "train.ckpt_interval=0",
        "train.plot=false",
        f"train.device={args.device}",
        f"run_dir={run_dir}",
    ]
    started = time.monotonic()
    rc = train_for([sys.executable, "-m", "megaeff.train", *overrides], run_dir, seconds, args.startup_s)
    rec = last_train_record(run_dir)
    if rc not in (0, -signal.SIGKILL) or rec is None:
        why = f"no train record within {args.startup_s:.0f} s" if rec is None else "the run failed"
        raise HardFailure(f"throughput {model} {precision}: exit {rc}, {why}")
    backends = run_dir / "backends.json"
    return {
        "model": model,
        "precision": precision,
        "seconds": round(time.monotonic() - started, 1),
        "step": rec.get("step"),
        "tokens_per_s": rec.get("tokens_per_s"),
        "mfu": rec.get("mfu"),
        "peak_mem_bytes": rec.get("peak_mem_bytes"),
        "backends": json.loads(backends.read_text()) if backends.is_file() else None,
    }


def throughput(step: Step, args: argparse.Namespace, workdir: Path) -> None:
    runs = [(m, p) for m in args.models for p in THROUGHPUT_PRECISIONS]
    share = args.throughput_s / len(runs)
    results = [throughput_run(m, p, share, args, workdir) for m, p in runs]
    step.details = {"runs": results}
    step.status = "passed"
    for r in results:
        log(
            f"{r['model']} {r['precision']}: {r['tokens_per_s'] or 0:,.0f} tokens/s, MFU {100 * (r['mfu'] or 0):.1f}%, "
            f"peak {(r['peak_mem_bytes'] or 0) / 2**30:.1f} GiB (step {r['step']})"
        )


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON report")
    ap.add_argument("--no-install", action="store_true", help="install nothing (use what is there)")
    ap.add_argument("--dry-run", action="store_true", help="probe and print the plan; install, build, run nothing")
    ap.add_argument("--budget-s", type=float, default=600, help="wall time of all the test phases together")
    ap.add_argument("--install-timeout-s", type=float, default=1800, help="per pip install (flash-attn may compile)")
    ap.add_argument(
        "--throughput-s",
        type=float,
        default=120,
        help="training time of all throughput runs (startup excluded); 0 skips",
    )
    ap.add_argument("--startup-s", type=float, default=180, help="per throughput run, until its first log line")
    ap.add_argument("--models", nargs="+", default=list(THROUGHPUT_MODELS))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--max-steps", type=int, default=5000, help="train.steps of a throughput run (it is cut by time)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="train.device of the throughput runs (cpu: to try the step)")
    ap.add_argument("--strict", action="store_true", help="a CUDA test skipped on the CUDA machine is a failure")
    ap.add_argument("--print-environment", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def plan(args: argparse.Namespace) -> List[Step]:
    return [
        Step("environment"),
        Step("install"),
        Step("build_csrc"),
        *(Step(f"tests:{name}") for name, _ in PHASES),
        Step("throughput"),
    ]


def execute(steps: List[Step], args: argparse.Namespace, workdir: Path) -> Dict:
    """Run the steps in order; the first HardFailure marks its step failed and leaves the rest 'not run'."""
    env: Dict = {}
    deadline = None
    for step in steps:
        t0 = time.monotonic()
        try:
            env = run_step(step, env, args, workdir, deadline)
            if step.name == "build_csrc":
                deadline = time.monotonic() + args.budget_s  # the test budget starts after installs and the build
        except HardFailure as exc:
            step.status, step.reason = "failed", str(exc)
            step.seconds = round(time.monotonic() - t0, 1)
            log(f"{step.name}: FAILED ({exc})")
            return {"first_failure": step.name, "env": env}
        step.seconds = round(time.monotonic() - t0, 1)
        log(f"{step.name}: {step.status}" + (f" ({step.reason})" if step.reason else ""))
    return {"first_failure": None, "env": env}


def run_step(step: Step, env: Dict, args: argparse.Namespace, workdir: Path, deadline: Optional[float]) -> Dict:
    if step.name == "environment":
        env = environment(in_process=True)
        step.details, step.status = env, "passed"
        return env
    # A CPU-only torch on a GPU machine is what the install step fixes: it runs where an NVIDIA device node exists.
    fixable = step.name == "install" and env.get("nvidia_device") and not args.no_install
    if not env.get("cuda_available") and not fixable:
        step.status, step.reason = "skipped", f"no CUDA device (torch {env.get('torch')}, CUDA {env.get('torch_cuda')})"
        return env
    if args.dry_run:
        step.status, step.reason = "skipped", "dry run"
        if step.name.startswith("tests:"):
            step.details = {"pytest": dict(PHASES)[step.name.split(":", 1)[1]]}
        return env
    if step.name == "install":
        if args.no_install:
            step.status, step.reason = "skipped", "--no-install"
            return env
        return install(step, env, args.install_timeout_s)
    if step.name == "build_csrc":
        build_csrc(step, env, args.install_timeout_s)
        return env
    if step.name.startswith("tests:"):
        phase = dict(PHASES)[step.name.split(":", 1)[1]]
        pytest_phase(step, phase, max(deadline - time.monotonic(), 0), args.strict, workdir)
        return env
    if step.name == "throughput":
        if args.throughput_s <= 0:
            step.status, step.reason = "skipped", "--throughput-s 0"
        else:
            throughput(step, args, workdir)
        return env
    raise ValueError(f"unknown step {step.name}")


def summary(steps: List[Step], outcome: Dict) -> str:
    width = max(len(s.name) for s in steps)
    lines = ["", "GPU check summary", "-" * 60]
    for s in steps:
        reason = f"  {s.reason}" if s.reason else ""
        lines.append(f"{s.name:<{width}}  {s.status:<8} {s.seconds:7.1f}s{reason}")
    if outcome["first_failure"]:
        lines.append(f"FAILED at {outcome['first_failure']}; later steps were not run")
    elif not outcome["env"].get("cuda_available"):
        lines.append("NOT CHECKED: no CUDA device")
    else:
        lines.append(
            "OK: no hard failure" + (" (see warnings above)" if any(s.status == "warning" for s in steps) else "")
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.print_environment:
        print(json.dumps(torch_environment()))
        return 0
    steps = plan(args)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="megaeff-gpu-check-") as tmp:
        outcome = execute(steps, args, Path(tmp))
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "environment": outcome["env"],
        "first_failure": outcome["first_failure"],
        "steps": [asdict(s) for s in steps],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(steps, outcome))
    log(f"report: {out}")
    if outcome["first_failure"]:
        return 1
    return 0 if outcome["env"].get("cuda_available") else 2


if __name__ == "__main__":
    sys.exit(main())
