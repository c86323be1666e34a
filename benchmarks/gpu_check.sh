#!/usr/bin/env bash
# The one GPU check (see benchmarks/gpu_check.py): run on a CUDA machine with the project
# installed, from anywhere; prints one table. Arguments pass through (out=FILE.json parts=...).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python benchmarks/gpu_check.py "$@"
