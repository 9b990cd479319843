#!/usr/bin/env bash
# The test command of the README and of CI: install everything (and Debian's chromium for the browser tests, where
# it is missing and we are root with apt), check the code's form and architecture (ruff, import-linter), run the
# whole suite in two pytest-xdist processes, a file each at a time (GPU tests are skipped when no GPU is visible),
# then the save / read-back tests again on the lowest pyarrow, pandas, numpy
# and dask pyproject.toml allows (ci/floor.sh). The floor's and the readers' environments are built alongside
# ci/install.sh. Meanwhile ci/check_gpu_extras.py checks that the gpu extras resolve to one CUDA stack (a pip dry run: needs
# the package index, not a GPU), ci/readers.sh reads files dask_clip wrote back with every reader of the
# README's "Output format" table, one environment per pyarrow release, and ci/gpu_rehearsal.sh (its own Python 3.12
# environment, from the start) builds the GPU machine's wheelhouse and rehearses the offline GPU check on the CPU.
# These side jobs run at a lower priority (nice 10) than install.sh and the suite. Every environment is installed
# with uv (ci/uv.sh), from one cache: about a minute of CPU time in all, where pip took nearly four. Extra
# arguments go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch's OpenMP threads sleep while they wait instead of spinning: the suite's tiny models run thousands of small
# parallel regions in more processes than there are cores (two pytest workers, their clusters' workers, the side
# jobs), and spinning threads then hold the cores the others need. Measured with three processes embedding with a
# tiny CLIP on the 2-core machine at load average 14-16: 63-102 s and 12-17 CPU-seconds each spinning, 0.4-1.9 s
# and 0.4-0.6 asleep (README, Development). It changes when a thread waits, not what it computes.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# The browser tests (tests/test_serve_browser.py) drive Debian's Chromium, installed alongside the venv; they
# never download a browser. Their screenshots of each page are CI's artifacts.
export DASK_CLIP_SCREENSHOTS="${DASK_CLIP_SCREENSHOTS:-test-artifacts/screenshots}"
chromium=true
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) &
    chromium=$!
fi
gpu_rehearsal_log=$(mktemp)
nice -n 10 bash ci/gpu_rehearsal.sh >"$gpu_rehearsal_log" 2>&1 &
gpu_rehearsal=$!
floor_log=$(mktemp)
nice -n 10 bash ci/floor.sh --build >"$floor_log" 2>&1 &
floor_build=$!
# The readers' check writes its files with .venv: it starts once ci/install.sh has made it (the marker file).
readers_log=$(mktemp) installed=$(mktemp -u)
{ nice -n 10 bash ci/readers.sh --build && until [ -e "$installed" ]; do kill -0 $$ 2>/dev/null || exit 1; sleep 1; done &&
    nice -n 10 bash ci/readers.sh --check; } >"$readers_log" 2>&1 &
readers=$!
bash ci/install.sh
touch "$installed"
[ "$chromium" = true ] || wait "$chromium"
gpu_extras_log=$(mktemp)
nice -n 10 .venv/bin/python ci/check_gpu_extras.py >"$gpu_extras_log" 2>&1 &
gpu_extras=$!
status=0
{ .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports &&
    .venv/bin/python -m pytest -n 2 --dist loadfile "$@" &&
    { wait "$floor_build" || { cat "$floor_log"; false; }; } && bash ci/floor.sh -q; } || status=$?
wait "$gpu_extras" || status=$((status ? status : $?))
cat "$gpu_extras_log"
wait "$readers" || status=$((status ? status : $?))
cat "$readers_log"
wait "$gpu_rehearsal" || status=$((status ? status : $?))
cat "$gpu_rehearsal_log"
exit "$status"
