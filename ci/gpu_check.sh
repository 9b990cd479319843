#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (CUDA 13 driver, >= 580): install the gpu extra, run the gpu-marked tests and
# both benchmarks in device mode, and print one table (decode and end-to-end images per second, nvJPEG vs
# Pillow agreement, peak GPU memory). Meant to take under 8 minutes on one H100-class GPU.
#     bash ci/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="test,gpu" bash ci/install.sh
.venv/bin/python - <<'PY'
import sys
import torch
from dask_clip.gpu_environment import check_torch_sees_gpus, detect

environment = detect()
print(environment.describe())
check_torch_sees_gpus(environment)  # names the fix when torch cannot use the driver's GPUs
if not environment.torch_gpus:
    sys.exit("ci/gpu_check.sh needs a GPU that torch can use; none is visible")
PY
results=$(mktemp -d)
status=0
.venv/bin/python -m pytest -m gpu -q -p no:cacheprovider --junitxml="$results/gpu-tests.xml" || status=$?
.venv/bin/python benchmarks/bench_decode.py --device cuda --repeat 2 --seconds 2
.venv/bin/python benchmarks/bench_embed.py --quick --decode-mode device --skip-extras
.venv/bin/python ci/gpu_report.py "$results/gpu-tests.xml"
exit "$status"
