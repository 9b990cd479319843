#!/usr/bin/env bash
# CI's rehearsal of the GPU check, so that a missing module or a version clash shows here rather than on the lent
# GPU machine: build the wheelhouse (ci/gpu_wheelhouse.sh, which fails at 60 MiB) into .gpu-wheelhouse/, then
# run ci/gpu_check.sh --offline on it in its CPU rehearsal mode, with the Python 3.12 of .venv-gpu-rehearsal/:
# the machine's versions of torch (2.11.0, its CUDA 13 build from PyPI), torchvision, transformers, numpy and
# the packages the wheelhouse leaves to the machine, and nothing else. Both folders are ignored by git; the
# environment is built once, with uv (ci/uv.sh: about a minute for torch's CUDA libraries, 5.4 GiB, downloaded
# where uv's cache lacks them) and updated when its requirements change (a requirement dropped from the list
# stays installed until the folder is removed). torch is 2.11.0, the machine's, not the 2.14.1 of .venv: with uv
# the index gives it quickly, so the rehearsal imports the very torch the wheelhouse's TorchCodec must load with.
#     bash ci/gpu_rehearsal.sh      (figures of the rehearsal in gpu-rehearsal-results/)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gpu-rehearsal WHEELHOUSE=.gpu-wheelhouse
started=$(date +%s)
python312=${PYTHON312:-$(ls -d ~/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)}
python312=${python312:-python3.12}
[ -x "$VENV/bin/python" ] || "$python312" -m venv "$VENV"
# its own interpreter throughout: it never waits for .venv (ci/test.sh starts it alongside ci/install.sh)
python=$VENV/bin/python
PYTHON=$python bash ci/gpu_wheelhouse.sh "$WHEELHOUSE"
echo "gpu_rehearsal: wheelhouse in $(($(date +%s) - started)) s"
pinned=$(grep -v '^#' ci/gpu_machine.txt | tr ' ' '\n' | grep '==' | grep -v -E '^(cupy|triton|nvidia)' | sort)
# the packages the wheelhouse relies on the machine for (their versions as pip would choose them, where unknown)
on_machine=$("$python" - "$WHEELHOUSE/wheelhouse.json" <<'PY'
import json, sys
for entry in json.load(open(sys.argv[1]))["on_machine"]:
    if entry["name"] == "nvidia-ml-py" or not entry["name"].startswith("nvidia-"):  # torch brings CUDA's libraries
        print(entry["name"] if entry["version"].startswith("any") else f"{entry['name']}=={entry['version']}")
PY
)
requirements=$(printf '%s\n' $pinned $on_machine pytest pytest-timeout scikit-image | sort -u | tr '\n' ' ')
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/requirements" 2>/dev/null)" != "$requirements" ]; then
    echo "gpu_rehearsal: building $VENV ($("$python" -V)): $requirements"
    # shellcheck disable=SC2086  # one word per requirement
    bash ci/uv.sh pip install --python "$VENV/bin/python" $requirements
    echo "$requirements" >"$VENV/requirements"
fi
"$VENV/bin/python" -c 'import sys; from importlib.metadata import version
torch, transformers, python = version("torch"), version("transformers"), sys.version.split()[0]
print(f"gpu_rehearsal: Python {python}, torch {torch} (as on the GPU machine, pinned by ci/gpu_machine.txt: its",
      f"CUDA build from the package index, which uv installs in about a minute), transformers {transformers}")'
echo "gpu_rehearsal: environment ready at $(($(date +%s) - started)) s"
PYTHON=$VENV/bin/python bash ci/gpu_check.sh --offline "$WHEELHOUSE" --out gpu-rehearsal-results --rehearse
echo "gpu_rehearsal: done in $(($(date +%s) - started)) s"
