"""megaeff package: the build-time parts (static metadata is in pyproject.toml).

`pip install -e .` for development (configs are read from ./conf). A regular install copies conf/ into the
package as megaeff/_conf so that `megaeff-train` works from any directory. The CUDA extension in csrc/ is built
when a CUDA-enabled torch is importable (use --no-build-isolation for that) and nvcc is found (CUDA_HOME);
MEGAEFF_BUILD_CSRC=0 skips it, MEGAEFF_BUILD_CSRC=1 makes a missing prerequisite an error.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
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


setup(
    cmdclass={"build_py": BuildPyWithConf, **EXT_CMDCLASS},
    ext_modules=EXT_MODULES,
)
