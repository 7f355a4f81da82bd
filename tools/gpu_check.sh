#!/usr/bin/env bash
# The GPU check, for the day a CUDA machine is lent: installs what is missing (pip: a CUDA torch build, Triton,
# flash-attn), builds the csrc FP8 AdamW extension, runs every CUDA-only test within 10 minutes (stopping at the
# first hard failure) and a 2-minute llama_60m / llama_350m throughput and MFU run with and without COAT, then
# prints a summary and writes a JSON report. The logic is tools/gpu_check.py (its docstring lists the steps).
#
#   bash tools/gpu_check.sh                      # everything, report in ./gpu_check.json
#   bash tools/gpu_check.sh --no-install --out /tmp/gpu.json --throughput-s 0
#   bash tools/gpu_check.sh --dry-run            # probe and show the plan only
#
# Run it from a megaeff checkout with the target environment's python first on PATH (the NGC image of
# docker/Dockerfile already has torch, Triton, flash-attn and apex). Exit status: 0 no hard failure, 1 a hard
# failure (the summary names it), 2 no CUDA device.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
python -c "import megaeff, pytest" 2>/dev/null || python -m pip install --no-build-isolation -e . "pytest>=8" "pytest-timeout>=2.3"
exec python tools/gpu_check.py "$@"
