#!/usr/bin/env bash
# The test command of the README and of CI: install everything, check the code's form and architecture
# (ruff, import-linter), then run the whole suite (GPU tests are skipped when no GPU is visible).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
