#!/usr/bin/env bash
# The CUDA path on one GPU in one go, inside 9 minutes (a 15-minute lease leaves time to rerun): QuEST's 30M and
# 100M shapes at the published 262,144 tokens per step, dense / W4A4 / NVFP4, eager and compiled; throughput and MFU
# of the steady state (compile and warm-up excluded, FLOPs counted by FlopCounterMode), planned against measured
# peak memory; then bf16 beside fp32 quantizer and rotation timings (benchmarks/bench_gpu.py).
# Usage: bash benchmarks/gpu_check.sh [--peak-tflops 989]      (989: dense bf16 peak of an H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 540 python benchmarks/bench_gpu.py --device cuda "$@"
