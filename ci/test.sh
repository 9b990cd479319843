#!/usr/bin/env bash
# The test command of the README and of CI: install everything, check the code's form and architecture
# (ruff, import-linter), run the whole suite (GPU tests are skipped when no GPU is visible), then the
# save / read-back tests again on the lowest pyarrow pyproject.toml allows (ci/floor.sh).
# Extra arguments go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
bash ci/floor.sh -q
