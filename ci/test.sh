#!/usr/bin/env bash
# The test command of the README and of CI: install everything, then run the whole suite
# (GPU tests are skipped when no GPU is visible). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
exec .venv/bin/python -m pytest "$@"
