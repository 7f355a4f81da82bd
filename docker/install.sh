#!/usr/bin/env bash
# The image's install steps, as one script: docker/Dockerfile runs it on the NGC PyTorch base image, and .ci/run
# runs it in a fresh virtual environment with a CPU torch standing in for the base image, so that the sequence is
# tested where no Docker daemon exists. Run from anywhere, with the target environment's python first on PATH.
#
# The base image's torch (with its NCCL, Triton, apex and flash-attn) is kept: a constraint pins torch to the
# installed build, so a dependency that wanted another torch fails the install instead of replacing it. Every step
# fails the build on error; flash-attn and apex are built only where torch has CUDA and they are not already there,
# and on a CUDA torch the image must end with every accelerator of docs/gpu.md importable (checked at the end).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

python -c "import torch" || {
    echo "docker/install.sh: torch is not importable; the base image (or, in CI, the caller) provides it" >&2
    exit 1
}
torch_version=$(python -c "import torch; print(torch.__version__)")
cuda=$(python -c "import torch; print(torch.version.cuda or '')")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"
echo "== docker/install.sh: torch $torch_version${cuda:+ (CUDA $cuda)} kept =="

# megaeff, its dependencies, W&B, the deepspeed launcher and the test runner. --no-build-isolation lets the
# optional CUDA extension (setup.py) build against this torch.
# On a CUDA torch MEGAEFF_BUILD_CSRC=1 makes a failed or impossible build of the extension an error, not a skip.
MEGAEFF_BUILD_CSRC=${MEGAEFF_BUILD_CSRC:-${cuda:+1}} \
    python -m pip install --no-build-isolation -c "$constraints" -e ".[wandb,deepspeed]" "pytest>=8" "pytest-timeout>=2.3"

if [[ -z "$cuda" ]]; then
    echo "== flash-attn: skipped, torch $torch_version has no CUDA (megaeff falls back to sdpa) =="
elif python -c "import flash_attn" 2>/dev/null; then
    echo "== flash-attn: the base image's $(python -c 'import flash_attn; print(flash_attn.__version__)') kept =="
else
    python -m pip install --no-build-isolation -c "$constraints" "flash-attn>=2.5"
fi

# apex (megaeff/layers/apex_ops.py: fused RMSNorm, multi-tensor Adam). The NGC base ships it; on a base without it,
# it is built from source with its CUDA extensions (the PyPI "apex" is another project). APEX_REF picks the commit.
if [[ -z "$cuda" ]]; then
    echo "== apex: skipped, torch $torch_version has no CUDA =="
elif python -c "import apex, fused_layer_norm_cuda, amp_C" 2>/dev/null; then
    echo "== apex: the base image's kept =="
else
    APEX_CPP_EXT=1 APEX_CUDA_EXT=1 python -m pip install -v --no-build-isolation -c "$constraints" \
        "apex @ git+https://github.com/NVIDIA/apex.git@${APEX_REF:-master}"
fi

# Triton ships with every CUDA torch (inductor needs it); the csrc FP8 AdamW extension was built by the editable
# install above (setup.py, where nvcc is found). On a CUDA torch each accelerator must import, else the image is
# not what docs/gpu.md promises: fail here (MEGAEFF_SKIP_GPU_VERIFY=1 skips the check, e.g. on a base that cannot
# load CUDA libraries without a driver). CI's CPU torch skips it in well under a second.
if [[ -n "$cuda" && "${MEGAEFF_SKIP_GPU_VERIFY:-0}" != "1" ]]; then
    python - <<'PY'
import importlib

missing = []
for module in ("flash_attn", "triton", "apex", "fused_layer_norm_cuda", "amp_C", "megaeff._fp8_adamw_cuda"):
    try:
        importlib.import_module(module)
    except Exception as exc:
        missing.append(f"{module} ({type(exc).__name__}: {exc})")
if missing:
    raise SystemExit("docker/install.sh: GPU accelerators missing from the image: " + "; ".join(missing))
print("== GPU accelerators: flash_attn, triton, apex (fused RMSNorm, multi-tensor Adam), csrc extension: importable ==")
PY
fi

python - "$torch_version" <<'PY'
import sys

import torch

import megaeff

assert torch.__version__ == sys.argv[1], f"torch changed from {sys.argv[1]} to {torch.__version__}"
print("megaeff", megaeff.__version__, "torch", torch.__version__)
PY
megaeff-train --help >/dev/null
