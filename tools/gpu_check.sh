#!/usr/bin/env bash
# On a GPU machine with torch / torchvision but no package index: install the wheels that
# tools/gpu_wheels.py put into .gpu_wheels/ (no index, no dependency resolution) into a
# private folder, then run the GPU check with the arguments given, e.g.
#   bash tools/gpu_check.sh --json gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
site="${TMPDIR:-/tmp}/iou_aware_retinanet_site"
if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .gpu_wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in .gpu_wheels/ (python tools/gpu_wheels.py downloads them): using what is installed" >&2
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
exec python3 -m iou_aware_retinanet.benchmarks.gpu_check "$@"
