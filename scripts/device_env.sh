#!/usr/bin/env bash
# Sourced on a lent GPU machine (the device tool), which has a CUDA torch but lacks some packages and FFmpeg: installs
# the wheels carried in .whl/ (git-ignored, about 52 MB, made here once) and exports the environment the project runs in.
#   mkdir -p .whl && for p in peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#       xxhash==4.1.0 hydra-core==1.3.2 omegaconf==2.3.1 jiwer==4.0.0 rapidfuzz==3.14.6 torchcodec==0.11.1 \
#       transformers==5.24.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1; do python3 -m pip download -q --no-deps \
#       --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $p; done
#   python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3          # sdist only on PyPI
#   # FFmpeg 7.1's shared libraries for torchcodec, from PyAV 15.1's wheel, linked under the names torchcodec loads:
#   REPO=$PWD; python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d /tmp/av av==15.1.0
#   (cd /tmp/av && unzip -q av-*.whl 'av.libs/*' && cd av.libs && for f in libav*.so.* libsw*.so.*; do
#       ln -sf "$f" "$(echo "$f" | sed -E 's/-[0-9a-f]{8}(\.so\.[0-9]+).*/\1/')"; done
#    cd .. && tar czf "$REPO/.whl/ffmpeg7-libs.tar.gz" av.libs)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/ffmpeg && tar xzf .whl/ffmpeg7-libs.tar.gz -C /tmp/ffmpeg
export PYTHONPATH=/tmp/site:$PWD LD_LIBRARY_PATH=/tmp/ffmpeg/av.libs:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PHI4_PRON_CACHE=$PWD/output/cache WANDB_MODE=disabled
export OUT=${OUT:-output/bench-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
