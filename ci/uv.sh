#!/usr/bin/env bash
# uv, the installer of CI's environments: on the 2-core machine it installs several times faster than pip for a
# fraction of the CPU time, and its cache (~/.cache/uv, or $UV_CACHE_DIR) serves every environment, hard-linking
# the files of a wheel it has unpacked once (torch's CUDA libraries, common to .venv and .venv-gpu-rehearsal;
# pandas and numpy, common to the readers' environments). Installed with pip from the package index into .uv/
# (ignored by git) on first use. uv does not read pip's configuration: for `pip install`, the index settings
# pip has here (`pip config list`: index-url, extra-index-url, find-links, constraint, cert) are passed on, and
# every index is searched for the best version as pip does, so that uv installs from where pip would.
#     bash ci/uv.sh pip install --python VENV/bin/python REQUIREMENT...
#     bash ci/uv.sh venv --python PYTHON VENV
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .uv/bin/uv ]; then
    mkdir -p .uv
    # several scripts start at once under ci/test.sh: one installs, the others wait for it
    flock .uv/lock bash -c '[ -x .uv/bin/uv ] || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --target .uv "uv==0.13.*" 2> >(grep -v "is ignored: it is neither" >&2)'
fi
[ "${1:-} ${2:-}" = "pip install" ] || exec .uv/bin/uv "$@"
options=(--index-strategy unsafe-best-match --quiet)
while IFS= read -r line; do  # e.g. global.extra-index-url='file:///a/simple file:///b/simple'
    key=${line#*.} key=${key%%=*} value=${line#*=} value=${value#\'} value=${value%\'}
    case $key in
        index-url | extra-index-url | find-links | constraint)
            for word in ${value//\\n/ }; do options+=("--$key" "$word"); done ;;
        cert) export SSL_CERT_FILE=${SSL_CERT_FILE:-$value} ;;
    esac
done < <(python3 -m pip config list 2>/dev/null)
shift 2
exec .uv/bin/uv pip install "${options[@]}" "$@"
