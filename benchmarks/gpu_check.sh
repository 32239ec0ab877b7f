#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): on the toy world with its pretrained CLIP, train in
# fp32/fp16/bf16/amp (the loss must fall and accuracy beat zero-shot; mixed precision must not be
# slower than fp32 on a GPU), kill and resume, evaluate, one epoch of every method, and a benchmark
# with a floor (ours at least as fast as the reference); one PASS/FAIL/SKIP line per check.
# usage: bash benchmarks/gpu_check.sh [--device cuda|cuda:N|cpu] [--size small|smallest] [--keep DIR]
#        [--only CHECK...] [--precisions P...] [--train-options KEY VALUE...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
