#!/usr/bin/env bash
# The test command (README): on a fresh machine, builds and tests the package twice:
#  1. against the CPU torch 2.13.0: the full test suite, then the C++ under AddressSanitizer
#     and UBSan (tools/sanitize.sh: an instrumented build in build/sanitize, the op-level tests
#     under each CPU kernel variant);
#  2. against the CUDA torch 2.14.1 with the CUDA kernels required (ADAGRAD8_CUDA=ON): proves
#     the CUDA code compiles, links and registers, and runs the full suite again (tests that
#     must execute CUDA kernels skip where no GPU is present).
# Set ADAGRAD8_TEST_SANITIZE=0 to skip the sanitizer run, ADAGRAD8_TEST_CUDA_BUILD=0 the second part.
set -euo pipefail
export ADAGRAD8_REQUIRE_HUGE=1  # tests/test_huge_tensors.py fails instead of skipping without the memory
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash tools/setup-env.sh .venv/cpu "torch==2.13.0"
.venv/cpu/bin/pytest -q tests
if [ "${ADAGRAD8_TEST_SANITIZE:-1}" != 0 ]; then
  bash tools/sanitize.sh .venv/cpu
fi

if [ "${ADAGRAD8_TEST_CUDA_BUILD:-1}" != 0 ]; then
  ADAGRAD8_CUDA=ON bash tools/setup-env.sh .venv/cuda "torch==2.14.1"
  ADAGRAD8_EXPECT_CUDA=1 .venv/cuda/bin/pytest -q tests
fi
