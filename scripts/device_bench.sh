#!/usr/bin/env bash
# The benchmark on a lent GPU machine (results in $OUT):
#   run(command="BENCH_ARGS='--only h100-r64' bash scripts/device_bench.sh train eval", carry=[".whl"])
set -uo pipefail
source scripts/device_env.sh
for mode in "$@"; do
  PHI4_PRON_BENCH_LOG=$OUT/$mode.jsonl python3 -m phi4_pron.bench $mode --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
    | grep -v -E "Warning|warnings.warn|it/s\]|s/it\]" | tee -a "$OUT/$mode.log" | tail -40
done
