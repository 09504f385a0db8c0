#!/usr/bin/env bash
# Refresh constraints/cpu.txt: every package of the CPU environment at an exact version, pip and setuptools (the build
# backend) included, so that CI installs what was tested. Builds a fresh environment from pyproject.toml (torch and
# torchcodec held at the pins below), then freezes it.
#   bash scripts/lock.sh && make test     # then commit constraints/cpu.txt
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
printf 'torch==2.13.0\ntorchcodec==0.13.0\n' > "$tmp/pins.txt"
"$tmp/venv/bin/python" -m pip install -q -c "$tmp/pins.txt" -e ".[dev]"
{
  echo "# The CPU environment (tests, the smoke job), every package pinned: bash scripts/lock.sh refreshes it."
  echo "# torch is the CPU wheel; torchcodec 0.17 fails to load beside it (it wants CUDA libraries), 0.12 and 0.13 work."
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | sed 's/^torch==\(.*\)+cpu$/torch==\1/'
} > constraints/cpu.txt
rm -rf "$tmp"
echo "constraints/cpu.txt: $(grep -c '==' constraints/cpu.txt) packages"
