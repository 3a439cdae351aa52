#!/usr/bin/env bash
# The CUDA path on one GPU, in under 5 minutes: at QuEST's 30M and 100M shapes (vocabulary 50,304, context 512,
# 262,144 tokens per step), bf16 and W4A4, eager and --compile, four steps each on synthetic tokens. One line per
# check: the memory plan's peak against torch.cuda.max_memory_allocated, micro-batch, tokens/s, MFU.
# Usage: bash benchmarks/gpu_check.sh [--peak-tflops 989]      (989: dense bf16 peak of an H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 300 python benchmarks/bench_trainers.py --device cuda "$@"
