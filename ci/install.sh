#!/usr/bin/env bash
# Create .venv inside the checkout (ignored by git) and install dask_clip with its test extras, with uv (ci/uv.sh:
# installed from the package index on first use; several times faster than pip here). .venv keeps pip: the tests
# and ci/check_gpu_extras.py run it. PyTorch is pinned to the build this project is tested with; override with
# TORCH_PACKAGES. Nothing is byte-compiled at install; Python compiles what it imports, once.
# The extras are test and img2dataset, plus OpenVINO (the openvino extra's runtime, as pyproject.toml asks for it)
# without NNCF, which only precision="int8" needs: no test compresses a model, and NNCF brings scikit-learn and
# more. Choose the extras with EXTRAS (test,img2dataset,openvino for NNCF too), and OPENVINO= for no OpenVINO.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PACKAGES=${TORCH_PACKAGES:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${EXTRAS:-test,img2dataset}
OPENVINO=${OPENVINO-$(sed -n 's/^openvino = \["\(openvino[^"]*\)".*/\1/p' pyproject.toml)}  # "openvino>=..."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC2086
bash ci/uv.sh pip install --python .venv/bin/python --upgrade-package pip pip $TORCH_PACKAGES $OPENVINO -e ".[${EXTRAS}]"
echo "dask_clip installed in $(pwd)/.venv"
