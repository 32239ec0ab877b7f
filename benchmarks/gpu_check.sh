#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): train in fp16/bf16/amp, kill and resume, evaluate and
# benchmark on one GPU in a few minutes; one PASS/FAIL/SKIP line per check.
# usage: bash benchmarks/gpu_check.sh [--device cuda|cuda:N|cpu] [--size small|smallest] [--keep DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
