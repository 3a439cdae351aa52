#!/usr/bin/env bash
# The CUDA path on one GPU in one go: tests/test_cuda.py (formats equal on GPU and CPU, bf16-autocast training beside
# fp32 on the CPU, compiled beside eager), then benchmarks/bench_gpu.py: FP4 round trips against a clone and int4,
# QuEST's 30M and 100M shapes at the published 262,144 tokens per step, dense / W4A4 / NVFP4, eager and compiled;
# throughput and MFU of the steady state (compile and warm-up excluded, FLOPs counted by FlopCounterMode), planned
# against measured peak memory. Each part stops at its time limit with what it printed so far.
# Usage: bash benchmarks/gpu_check.sh [--peak-tflops 989]      (989: dense bf16 peak of an H100/H200)
#        TEST_SECONDS=150 BENCH_SECONDS=360 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
timeout "${TEST_SECONDS:-150}" python -m pytest -q -p no:cacheprovider tests/test_cuda.py -o addopts="" --durations=5
tests=$?
timeout "${BENCH_SECONDS:-360}" python benchmarks/bench_gpu.py --device cuda "$@"
bench=$?
echo "tests exit $tests, benchmark exit $bench (124: stopped at its time limit)"
exit $(( tests || bench ))
