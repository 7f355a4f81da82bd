#!/usr/bin/env bash
# The image's install steps, as one script: docker/Dockerfile runs it on the NGC PyTorch base image, and .ci/run
# runs it in a fresh virtual environment with a CPU torch standing in for the base image, so that the sequence is
# tested where no Docker daemon exists. Run from anywhere, with the target environment's python first on PATH.
#
# The base image's torch (with its NCCL, Triton, apex and flash-attn) is kept: a constraint pins torch to the
# installed build, so a dependency that wanted another torch fails the install instead of replacing it. Every step
# fails the build on error; flash-attn is built only where torch has CUDA and flash-attn is not already there.
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
python -m pip install --no-build-isolation -c "$constraints" -e ".[wandb,deepspeed]" "pytest>=8" "pytest-timeout>=2.3"

if [[ -z "$cuda" ]]; then
    echo "== flash-attn: skipped, torch $torch_version has no CUDA (megaeff falls back to sdpa) =="
elif python -c "import flash_attn" 2>/dev/null; then
    echo "== flash-attn: the base image's $(python -c 'import flash_attn; print(flash_attn.__version__)') kept =="
else
    python -m pip install --no-build-isolation -c "$constraints" "flash-attn>=2.5"
fi

python - "$torch_version" <<'PY'
import sys

import torch

import megaeff

assert torch.__version__ == sys.argv[1], f"torch changed from {sys.argv[1]} to {torch.__version__}"
print("megaeff", megaeff.__version__, "torch", torch.__version__)
PY
megaeff-train --help >/dev/null
