#!/usr/bin/env bash
# Create .venv inside the checkout (ignored by git) and install dask_clip with its test extras.
# PyTorch is pinned to the build this project is tested with; override with TORCH_PACKAGES. Nothing is byte-compiled
# at install (--no-compile: half of torch's install time); Python compiles what it imports, once.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PACKAGES=${TORCH_PACKAGES:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${EXTRAS:-test,img2dataset,openvino}

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
pip() { .venv/bin/python -m pip --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install --no-compile --upgrade pip
# shellcheck disable=SC2086
pip install --no-compile $TORCH_PACKAGES
pip install --no-compile -e ".[${EXTRAS}]"
echo "dask_clip installed in $(pwd)/.venv"
