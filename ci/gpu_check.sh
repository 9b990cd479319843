#!/usr/bin/env bash
# The GPU check, for a bare GPU machine without a package index: install the wheelhouse that ci/gpu_wheelhouse.sh
# made (pip install --no-index --no-deps --target, a folder put first on PYTHONPATH; nothing else is installed),
# then run ci/gpu_check.py: the gpu-marked tests, throughput (end to end, model only, decode only), GPU packing,
# the out-of-memory error and fidelity, with a ViT-L/14-shaped model. Every figure goes to gpu_check.json and
# gpu_check.md in --out (default: $OUT, else gpu-check-results/). Under 8 minutes on one H200.
# Without a GPU, or with --rehearse, it is a CPU rehearsal at tiny sizes that says which steps need a GPU. Other
# options (--steps, --deadline, --images-224, --images-photo) go to ci/gpu_check.py.
#     bash ci/gpu_check.sh --offline WHEELHOUSE [--out FOLDER] [--rehearse] [--steps a,b] [--deadline S]
set -euo pipefail
cd "$(dirname "$0")/.."
usage() {
    echo "usage: bash ci/gpu_check.sh --offline WHEELHOUSE [--out FOLDER] [--rehearse] [--steps a,b] [--deadline S]" >&2
    exit 2
}
wheelhouse= out=${OUT:-gpu-check-results} options=()
while [ $# -gt 0 ]; do
    case $1 in
        --offline) wheelhouse=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --rehearse) options+=(--rehearse); shift ;;
        --steps|--deadline|--images-224|--images-photo) options+=("$1" "${2:?}"); shift 2 ;;
        *) usage ;;
    esac
done
[ -n "$wheelhouse" ] && [ -f "$wheelhouse/wheelhouse.json" ] || usage
python=${PYTHON:-python3}
site=$(mktemp -d)/site
trap 'rm -rf "$(dirname "$site")"' EXIT
started=$(date +%s)
"$python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "$wheelhouse"/*.whl
echo "gpu_check: installed $(ls "$wheelhouse"/*.whl | wc -l) wheels from $wheelhouse in $(($(date +%s) - started)) s"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$python" ci/gpu_check.py "$out" --wheelhouse "$wheelhouse" "${options[@]}"
