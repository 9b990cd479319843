#!/usr/bin/env bash
# The save / read-back tests on the lowest pyarrow, pandas, numpy and dask that pyproject.toml allows, in a second small
# environment (.venv-floor, ignored by git, installed with uv: ci/uv.sh; no torch: these tests need none). dask_clip
# is taken from the checkout (PYTHONPATH), so that building this environment can run alongside ci/install.sh.
#
#   bash ci/floor.sh [pytest options]    build the environment where needed, then run the tests
#   bash ci/floor.sh --build             only build it (ci/test.sh does this in the background)
set -euo pipefail
cd "$(dirname "$0")/.."
floor() { sed -n "s/^ *\"$1\(\[[a-z,]*\]\)\?>=\([0-9.]*\)\",$/\2/p" pyproject.toml; }  # floor NAME: X of "NAME[...]>=X"
if [ ! -x .venv-floor/bin/python ]; then
    bash ci/uv.sh venv --quiet --python "${PYTHON:-python3}" .venv-floor
fi
bash ci/uv.sh pip install --python .venv-floor/bin/python "pyarrow==$(floor pyarrow).*" "pandas==$(floor pandas).*" \
    "numpy==$(floor numpy).*" "dask[dataframe]==$(floor dask).*" "distributed==$(floor dask).*" "fsspec>=2024.2" \
    "pillow>=10.1" "safetensors>=0.4" "tqdm>=4.60" "faiss-cpu>=1.8" pytest pytest-timeout
[ "${1:-}" = --build ] && exit 0
export PYTHONPATH=$PWD
.venv-floor/bin/python -c 'import dask, numpy, pandas, pyarrow
print(f"pyarrow {pyarrow.__version__}, pandas {pandas.__version__}, numpy {numpy.__version__}, dask {dask.__version__}",
      "(the floors of pyproject.toml)")'
exec .venv-floor/bin/python -m pytest -p no:cacheprovider tests/test_null_embeddings.py tests/test_vector_layouts.py "$@"
