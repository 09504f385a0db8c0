#!/usr/bin/env bash
# The GPU tier of the tests (make test-gpu) on a lent GPU machine (log in $OUT/test-gpu.log):
#   run(command="bash scripts/device_test_gpu.sh", carry=[".whl"])
set -uo pipefail
source scripts/device_env.sh
python3 -m pytest -q -m gpu -p no:cacheprovider tests "$@" 2>&1 | tee "$OUT/test-gpu.log" | tail -60
