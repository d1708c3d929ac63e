#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a lent GPU machine, from a copy of this repository: no install step
# (the machine has no network; its python holds torch, transformers, peft and accelerate), the package from src/.
# Prints the table at the end; the whole log also goes to $OUT/gpu_check.log when OUT is set.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
