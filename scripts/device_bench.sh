#!/usr/bin/env bash
# The benchmark on a lent GPU machine (the device tool), which lacks some packages and FFmpeg:
#   run(command="bash scripts/device_bench.sh train check", carry=[".whl"])
# .whl/ holds the wheels (pip download, see /work/.library/device/README.md) and ffmpeg7-libs.tar.gz: FFmpeg 7.1's
# shared libraries from PyAV 15.1's wheel (av.libs/, with libavcodec.so.61-style links) for torchcodec.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/ffmpeg && tar xzf .whl/ffmpeg7-libs.tar.gz -C /tmp/ffmpeg
export PYTHONPATH=/tmp/site:$PWD LD_LIBRARY_PATH=/tmp/ffmpeg/av.libs:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PHI4_PRON_CACHE=$PWD/output/cache WANDB_MODE=disabled
OUT=${OUT:-output/bench-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip show pyarrow fsspec huggingface_hub 2>/dev/null | grep -E "^(Name|Version)"
for mode in "$@"; do
  PHI4_PRON_BENCH_LOG=$OUT/$mode.jsonl python3 -m phi4_pron.bench $mode --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
    | grep -v -E "Warning|warnings.warn|it/s\]|s/it\]" | tee -a "$OUT/$mode.log" | tail -40
done
