#!/usr/bin/env bash
# The save / read-back tests on the lowest pyarrow that pyproject.toml allows, in a second small environment
# (.venv-floor, ignored by git; no torch: these tests need none).
set -euo pipefail
cd "$(dirname "$0")/.."
FLOOR=$(sed -n 's/^ *"pyarrow>=\([0-9.]*\)",$/\1/p' pyproject.toml)
if [ ! -x .venv-floor/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv-floor
fi
pip() { .venv-floor/bin/python -m pip --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install "pyarrow==${FLOOR}" "dask[distributed,dataframe]>=2025.1" "pandas>=2.2" "numpy>=1.26" "fsspec>=2024.2" \
    "pillow>=10.1" "safetensors>=0.4" "tqdm>=4.60" "faiss-cpu>=1.8" pytest pytest-timeout
pip install --no-deps -e .
echo "pyarrow $(.venv-floor/bin/python -c 'import pyarrow; print(pyarrow.__version__)') (the floor of pyproject.toml)"
exec .venv-floor/bin/python -m pytest -p no:cacheprovider tests/test_null_embeddings.py "$@"
