#!/usr/bin/env bash
# Set up .venv for CPU work (tests, the smoke job): FFmpeg for torchcodec, torch 2.13.0 CPU, the project.
# GPU users: see README.md ("Real model, real data") for the CUDA install instead.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ldconfig -p 2>/dev/null | grep -q libavcodec; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "torchcodec needs FFmpeg's libraries: sudo apt-get install ffmpeg (or conda install ffmpeg)" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# pip, and the setuptools that builds this package, pinned too: an upstream release changes nothing here
.venv/bin/python -m pip install -q --upgrade -c constraints/cpu.txt pip
.venv/bin/python -m pip install -q -c constraints/cpu.txt --build-constraint constraints/cpu.txt -e ".[dev]"
