"""The package outside a source checkout: a regular (non-editable) install finds its packaged configs, and the
launcher scripts are valid shell."""

from __future__ import annotations

import shutil
import site
import subprocess
import venv
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env

pytestmark = pytest.mark.slow


def _bare_venv(path: Path) -> Path:
    """A new venv with only what `python3 -m venv` gives (pip and, on older Pythons, setuptools; no wheel), which
    also sees the test environment's packages (torch, hydra, ...) through a .pth file, so that megaeff itself is
    the only thing installed into it. Build isolation (pip's default) then fetches the build requirements that
    pyproject.toml names, as it does for a user."""
    venv.EnvBuilder(with_pip=True).create(path)
    py = path / "bin" / "python"
    site_dir = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site_dir) / "outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return py


def _bare_env(**extra) -> dict:
    """The environment of a process in the bare venv: what it imports must come from the venv, so a PYTHONPATH
    pointing at a source tree (as when the suite runs from a worktree) is dropped."""
    env = cli_env(**extra)
    env.pop("PYTHONPATH", None)
    return env


def _source_copy(dest: Path) -> Path:
    """Build from a copy: setuptools writes build/ and *.egg-info next to setup.py."""
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    for name in ("megaeff", "conf", "csrc"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "_conf", "_csrc"))
    return dest


def _pip(py: Path, *args: str, cwd: Path) -> None:
    proc = subprocess.run(
        [str(py), "-m", "pip", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env=_bare_env(PIP_DISABLE_PIP_VERSION_CHECK="1", MEGAEFF_BUILD_CSRC="0"),
    )
    assert proc.returncode == 0, " ".join(args) + "\n" + proc.stdout + proc.stderr


def test_wheel_and_install_in_a_bare_venv_ship_configs_and_entry_points(tmp_path):
    py = _bare_venv(tmp_path / "venv")
    own_wheel = subprocess.run([str(py), "-c", "import wheel"], capture_output=True)
    assert own_wheel.returncode != 0, "the bare venv already has `wheel`: this test would not see it missing"
    src = _source_copy(tmp_path / "src")
    # `pip wheel .`: what a cluster's shared environment or the Docker image builds.
    _pip(py, "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), ".", cwd=src)
    wheels = list((tmp_path / "dist").glob("megaeff-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        names = set(zf.namelist())
    assert {"megaeff/_conf/config.yaml", "megaeff/_csrc/fp8_adamw_cpu.cpp"} <= names
    # A non-editable `pip install .` from the source tree.
    _pip(py, "install", "--no-deps", "--quiet", ".", cwd=src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [str(py.parent / "megaeff-train"), "model=llama_60m", "--cfg", "job"],
        capture_output=True,
        text=True,
        env=_bare_env(),
        cwd=elsewhere,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "name: llama_60m" in proc.stdout and "dim: 512" in proc.stdout
    located = subprocess.run(
        [str(py), "-c", "from megaeff.cli.train import conf_dir; print(conf_dir())"],
        capture_output=True,
        text=True,
        env=_bare_env(),
        cwd=elsewhere,
        timeout=60,
    )
    assert located.stdout.strip().endswith("megaeff/_conf"), located.stdout + located.stderr
    # The CPU FP8 AdamW kernel compiles from the shipped sources.
    kernel = subprocess.run(
        [str(py), "-c", "from megaeff.kernels.fp8_adamw_cpp import csrc_dir; print(csrc_dir())"],
        capture_output=True,
        text=True,
        env=_bare_env(),
        cwd=elsewhere,
        timeout=60,
    )
    assert kernel.stdout.strip().endswith("megaeff/_csrc"), kernel.stdout + kernel.stderr
    # `pip install -e .` (the README's command) in the same bare venv: the package is then the source tree's.
    _pip(py, "install", "--no-deps", "--quiet", "-e", ".", cwd=src)
    editable = subprocess.run(
        [str(py), "-c", "import megaeff.cli.train as t; print(t.__file__); print(t.conf_dir())"],
        capture_output=True,
        text=True,
        env=_bare_env(),
        cwd=elsewhere,
        timeout=60,
    )
    assert editable.stdout.split() == [str(src / "megaeff" / "cli" / "train.py"), str(src / "conf")], (
        editable.stdout + editable.stderr
    )


@pytest.mark.parametrize(
    "script",
    [
        "launch/torchrun_single_node.sh",
        "launch/torchrun_multi_node.sh",
        "launch/deepspeed.sh",
        "launch/slurm/train.sbatch",
        ".ci/run",
    ],
)
def test_launch_scripts_are_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
