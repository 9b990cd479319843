#!/usr/bin/env bash
# Download into DIR the wheels the lent GPU machine lacks for ci/gpu_check.sh --offline (dask, distributed,
# dask-cuda 26.10 and their small dependencies, TorchCodec 0.16, dask_clip itself), for CPython 3.12 manylinux
# x86-64; fails when they reach 60 MiB together. Needs the package index (here), not a GPU. See ci/gpu_wheelhouse.py.
#     bash ci/gpu_wheelhouse.sh DIR [--also pyarrow==26.*]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash ci/gpu_wheelhouse.sh DIR [--also REQUIREMENT ...]" >&2; exit 2; }
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
exec "$python" ci/gpu_wheelhouse.py "$@" 2> >(grep -v "is ignored: it is neither" >&2)
