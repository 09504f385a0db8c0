#!/usr/bin/env bash
# The restructuring's A/B on a lent GPU machine: the benchmark rows of commit 17cc71b (the code before it, in .before/:
# `git archive 17cc71b phi4_pron conf | tar -x -C .before && ln -s ../data .before/data`) against this tree's rows
# of the same settings, on one machine, with one compiler cache (so the second of a pair compiles warm).
#   run(command="bash experiments/benchmarks/restructure_ab.sh r64 unfreeze-before", carry=[".whl", ".before"])
# Phases: r64, unfreeze-before, unfreeze-after, eval, tests (the GPU tier), job and job-warm (bench job, h100-r64, with
# a compiler cache of their own: the first compiles cold, the second reuses its cache, as a second run or sweep job does).
set -uo pipefail
source scripts/device_env.sh > /dev/null
nvidia-smi -L
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor PHI4_PRON_BENCH_LOG=$OUT/rows.jsonl
ROOT=$PWD/output/bench
show() { grep -E '^\{|^\| |rror|Killed' | grep -v "^| run \|^| eval-model" | tail -6; }
before() { (cd .before && PYTHONPATH=/tmp/site:$PWD timeout "$1" python3 -m phi4_pron.bench "${@:2}" --root "$ROOT" 2>&1 | show); }
after() { timeout "$1" python3 -m phi4_pron.bench "${@:2}" --root "$ROOT" 2>&1 | show; }
for phase in "$@"; do
  echo "== $phase $(date -u +%H:%M:%S)"
  case $phase in
    r64) before 300 train --only 1 --out "$OUT/before-r64"; after 200 train --only h100-r64 --out "$OUT/after-r64" ;;
    unfreeze-before) before 330 train --only 4 --out "$OUT/before-unfreeze" ;;
    unfreeze-after) after 250 train --only h100-unfreeze --out "$OUT/after-unfreeze" ;;
    eval) before 300 eval --only 1 2 --out "$OUT/before-eval"
          after 250 eval --only h100-cold h100-warm --out "$OUT/after-eval" ;;
    tests) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/test-gpu.log" ;;
    job) TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-job after 500 job --only h100-r64 --out "$OUT/job" ;;
    job-warm) TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-job after 450 job --only h100-r64 --out "$OUT/job-warm" ;;
  esac
done
echo "== done $(date -u +%H:%M:%S)"
