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

# The two environments take about 8 GB (the CUDA torch alone 6 GB); on a full disk pip fails
# late with "No space left on device". Say it up front. The compiled tests' Inductor cache (36 MB
# a run) goes to a directory removed when the run ends, not to /tmp/torchinductor_$USER for good.
free_gb=$(( $(df -Pk "$root" | awk 'NR==2 {print $4}') / 1048576 ))
if [ "$free_gb" -lt 12 ]; then
  echo "[test] warning: $free_gb GB free on the disk holding $root; a full run needs about 12 GB" >&2
fi
if [ -z "${TORCHINDUCTOR_CACHE_DIR:-}" ]; then
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d -t adagrad8-inductor.XXXXXX)
  export TORCHINDUCTOR_CACHE_DIR
  trap 'echo "[test] removing the Inductor cache ($(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1))";
        rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT
fi

bash tools/setup-env.sh .venv/cpu "torch==2.13.0"
.venv/cpu/bin/pytest -q tests
if [ "${ADAGRAD8_TEST_SANITIZE:-1}" != 0 ]; then
  bash tools/sanitize.sh .venv/cpu
fi

if [ "${ADAGRAD8_TEST_CUDA_BUILD:-1}" != 0 ]; then
  ADAGRAD8_CUDA=ON bash tools/setup-env.sh .venv/cuda "torch==2.14.1"
  ADAGRAD8_EXPECT_CUDA=1 .venv/cuda/bin/pytest -q tests
fi
