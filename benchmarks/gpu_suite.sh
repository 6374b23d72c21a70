#!/usr/bin/env bash
# The GPU rows of the README in one command (benchmarks/gpu_suite.py): installs the peers
# (trl, liger-kernel, datasets, dill, multiprocess) from the git-ignored wheels/ folder when
# they are missing, then runs every row, one process each, and writes one JSON.
#   bash benchmarks/gpu_suite.sh --output "$OUT/gpu_suite.json"    # on the GPU machine
#   bash benchmarks/gpu_suite.sh --device cpu --tiny                # CPU smoke run
# wheels/ is made once, where a package registry is reachable:
#   pip download --no-deps 'trl==1.16.*' liger-kernel 'datasets==5.2.*' dill multiprocess -d wheels/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 multiprocess -d wheels/
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ls wheels/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import trl, liger_kernel, datasets" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-index --find-links wheels \
        trl liger-kernel datasets dill multiprocess
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
