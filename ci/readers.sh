#!/usr/bin/env bash
# Reads parquet files that dask_clip wrote back with every reader of the README's layout table, each in its own
# small environment under .venv-readers/ (ignored by git): pyarrow 15, 19 and 23 with pandas, then pyarrow 25
# with pandas, dask, Polars, DuckDB, Hugging Face datasets, webdataset and LanceDB (one environment: the same
# pandas and numpy as pyarrow 25 alone would get), then the project's .venv (pyarrow 26) when there is one.
# An environment is built once (with uv: ci/uv.sh) and rebuilt only when its requirements below change.
# The environments read in parallel; each line names the environment, the reader and what it read. Exit status: non-zero when any read failed.
#
#   bash ci/readers.sh FOLDER [read_back.py options, e.g. --expect image_embedding:5:32]
#   bash ci/readers.sh --build     (only build the environments)
#   bash ci/readers.sh --check     (CI: build, write every layout with ci/write_for_readers.py, read each back;
#                                   fixed_size_list only with the project's .venv: its null rows need pyarrow 26)
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS=.venv-readers
# name | requirements (pandas and numpy as an environment pinned to that pyarrow would have them)
ENVIRONMENTS=(
    "pyarrow15|pyarrow==15.0.2 pandas==2.2.3 numpy<2"
    "pyarrow19|pyarrow==19.0.1 pandas==2.2.3 numpy<2.3"
    "pyarrow23|pyarrow==23.0.1 pandas==2.3.3"
    "pyarrow25|pyarrow==25.0.1 pandas polars duckdb datasets webdataset dask[dataframe] lancedb"
)

build() {  # build() NAME REQUIREMENTS: create or update .venv-readers/NAME unless it already has REQUIREMENTS
    local name=$1 requirements=$2 venv=$VENVS/$1
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/requirements" 2>/dev/null)" = "$requirements" ]; then
        return
    fi
    echo "building $venv: $requirements" >&2
    rm -rf "$venv"
    bash ci/uv.sh venv --quiet --python "${PYTHON:-python3}" "$venv"
    # shellcheck disable=SC2086  # one word per requirement
    bash ci/uv.sh pip install --python "$venv/bin/python" $requirements
    echo "$requirements" >"$venv/requirements"
}

builds=()
for environment in "${ENVIRONMENTS[@]}"; do
    build "${environment%%|*}" "${environment#*|}" &
    builds+=($!)
done
for pid in "${builds[@]}"; do wait "$pid"; done
[ "${1:-}" = "--build" ] && exit 0
if [ "${1:-}" = "--check" ]; then
    written=$(mktemp -d)
    trap 'rm -rf "$written"' EXIT
    .venv/bin/python ci/write_for_readers.py "$written" >/dev/null
    status=0
    for folder in saved resharded float16; do
        # shellcheck disable=SC2046  # the expect file holds one word per argument
        bash "$0" "$written/$folder" $(cat "$written/$folder/expect") || status=1
    done
    # shellcheck disable=SC2046
    .venv/bin/python ci/read_back.py "$written/fixed_size_list" $(cat "$written/fixed_size_list/expect") || status=1
    exit "$status"
fi
[ $# -ge 1 ] || { echo "usage: bash ci/readers.sh FOLDER [read_back.py options]" >&2; exit 2; }

names=() pythons=()
for environment in "${ENVIRONMENTS[@]}"; do
    names+=("${environment%%|*}") pythons+=("$VENVS/${environment%%|*}/bin/python")
done
if [ -x .venv/bin/python ]; then
    names+=(.venv) pythons+=(.venv/bin/python)
fi

logs=$(mktemp -d)
pids=()
for i in "${!pythons[@]}"; do
    "${pythons[$i]}" ci/read_back.py "$@" >"$logs/$i" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || status=1
    sed "s/^/[${names[$i]}] /" "$logs/$i"
done
rm -rf "$logs"
exit "$status"
