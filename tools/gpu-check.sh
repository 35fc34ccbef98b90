#!/usr/bin/env bash
# The prepared GPU check: every CUDA path of dedn once, timed; prints one JSON line (tools/gpu_check.py).
#
# On a CUDA machine, from the repository root:   bash tools/gpu-check.sh [--out FILE]   (under 8 minutes;
# FILE is rewritten after every section, so a check cut short still leaves what it measured). Every option
# goes to the script (--small, --device, --budget-s: python tools/gpu_check.py --help).
# Without installing dedn: the source tree is put on PYTHONPATH. Where the machine lacks a dependency and has
# no network, `make gpu-wheels` (on a machine with one) downloads the missing pure-Python wheels into .whl/,
# which this script installs into /tmp/dedn-site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dedn-site \
        .whl/*.whl >&2 || exit 2
    export PYTHONPATH="/tmp/dedn-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" tools/gpu_check.py "$@"
