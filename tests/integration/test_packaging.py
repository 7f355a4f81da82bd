"""The package outside a source checkout: a regular (non-editable) install finds its packaged configs, and the
launcher scripts are valid shell."""

from __future__ import annotations

import shutil
import subprocess
import venv

import pytest

from helpers import REPO, cli_env

pytestmark = pytest.mark.slow


def test_wheel_install_ships_configs_and_entry_points(tmp_path):
    env_dir = tmp_path / "venv"
    # System site-packages provide torch, hydra and the rest; only megaeff itself is installed into the venv.
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # Build from a copy: setuptools writes build/ and *.egg-info next to setup.py.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("megaeff", "conf", "csrc"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_conf", "_csrc"))
    build = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", str(src)],
        capture_output=True, text=True, env=cli_env(PIP_DISABLE_PIP_VERSION_CHECK="1"), cwd=tmp_path, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [str(env_dir / "bin" / "megaeff-train"), "model=llama_60m", "--cfg", "job"],
        capture_output=True, text=True, env=cli_env(), cwd=elsewhere, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "name: llama_60m" in proc.stdout and "dim: 512" in proc.stdout
    located = subprocess.run(
        [str(py), "-c", "from megaeff.cli.train import conf_dir; print(conf_dir())"],
        capture_output=True, text=True, env=cli_env(), cwd=elsewhere, timeout=60,
    )
    assert located.stdout.strip().endswith("megaeff/_conf"), located.stdout + located.stderr
    # The CPU FP8 AdamW kernel compiles from the shipped sources.
    kernel = subprocess.run(
        [str(py), "-c", "from megaeff.kernels.fp8_adamw_cpp import csrc_dir; print(csrc_dir())"],
        capture_output=True, text=True, env=cli_env(), cwd=elsewhere, timeout=60,
    )
    assert kernel.stdout.strip().endswith("megaeff/_csrc"), kernel.stdout + kernel.stderr


@pytest.mark.parametrize(
    "script",
    ["launch/torchrun_single_node.sh", "launch/torchrun_multi_node.sh", "launch/deepspeed.sh", "launch/slurm/train.sbatch", ".ci/run"],
)
def test_launch_scripts_are_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
