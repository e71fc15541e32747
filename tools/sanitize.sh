#!/usr/bin/env bash
# The C++ under AddressSanitizer and UndefinedBehaviorSanitizer: builds an instrumented copy of
# the extension (CMake option ADAGRAD8_SANITIZE: -fsanitize=address,undefined,float-cast-overflow,
# CPU only) into build/sanitize/site, never into the environment's site-packages, then runs the
# op-level tests against it with the sanitizer runtimes preloaded into Python, once per CPU kernel variant
# (ATEN_CPU_CAPABILITY default, avx2, avx512 where this CPU has them; under avx512 also with
# ADAGRAD8_CODE_SEARCH=permute and =gather, and with ADAGRAD8_NO_VBMI=1 where the CPU has
# AVX512-VBMI). Any sanitizer report or test failure fails the script.
#
#   bash tools/sanitize.sh               # with .venv/cpu (made by tools/setup-env.sh), as tools/test.sh
#   bash tools/sanitize.sh VENV_DIR      # another environment with torch and the test tools
#   bash tools/sanitize.sh VENV_DIR -k X # extra arguments go to every pytest run
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv/cpu}
[[ "$venv" == /* ]] || venv="$PWD/$venv"
shift || true
cd "$root"
py="$venv/bin/python"
[ -x "$py" ] || { echo "[sanitize] no $py: run tools/setup-env.sh first" >&2; exit 2; }
build="$root/build/sanitize"  # /build/ is gitignored
site="$build/site"

# ---- 1. the instrumented build (incremental: build/sanitize/cmake is kept between runs).
echo "[sanitize] building the ASan+UBSan copy of torch_adagrad8 into ${site#"$root"/}"
start=$SECONDS
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
mkdir -p "$build"
log="$build/pip.log"
# Debug: no -DNDEBUG, so the debug-only checks in torch's inline headers run too (ADAGRAD8_SANITIZE
# sets -O1); install.strip=false keeps the debug info, for file:line in the reports.
set +e  # pip's full output goes to $log; its compile steps ([i/n]) are shown as they come
"$py" -m pip install -v --no-build-isolation --no-deps --upgrade --target "$site" \
  -C build-dir="$build/cmake" -C cmake.build-type=Debug -C install.strip=false \
  -C cmake.define.ADAGRAD8_SANITIZE=ON -C cmake.define.ADAGRAD8_CUDA=OFF . \
  2>&1 | tee "$log" | grep -E --line-buffered "^ *\[[0-9]+/[0-9]+\]"
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
  tail -n 60 "$log" >&2
  echo "[sanitize] FAILED: the instrumented build failed (pip exit $status; full log: ${log#"$root"/})" >&2
  exit 1
fi
lib=$(ls "$site"/torch_adagrad8/*adagrad8*.so 2>/dev/null | head -1)
[ -n "$lib" ] || { echo "[sanitize] FAILED: the build left no library in $site/torch_adagrad8" >&2; exit 1; }
echo "[sanitize] built ${lib#"$root"/} in $((SECONDS - start)) s"
# The library and each CPU kernel variant's object must call into both runtimes.
objects=("$build"/cmake/CMakeFiles/adagrad8_cpu_*.dir/csrc/cpu/kernels.cpp.o)
[ -e "${objects[0]}" ] || { echo "[sanitize] FAILED: no CPU kernel objects in ${build#"$root"/}/cmake" >&2; exit 1; }
for obj in "$lib" "${objects[@]}"; do
  imports=$(nm $([[ "$obj" == *.so ]] && echo -D) --undefined-only "$obj")
  for prefix in __asan_report_ __ubsan_handle_; do
    if [[ "$imports" != *" $prefix"* ]]; then
      echo "[sanitize] FAILED: ${obj#"$root"/} is not instrumented (no $prefix* references)" >&2; exit 1
    fi
  done
done

# ---- 2. the sanitizer environment.
# Python and torch are not instrumented, so ASan's runtime must be in the process before
# anything else: preload the runtimes the library links (gcc: libasan and libubsan).
preload=""
for rt in $(ldd "$lib" | awk '/lib(asan|ubsan)\.so/ {print $3}'); do preload="$preload${preload:+:}$rt"; done
[[ "$preload" == *libasan* ]] || { echo "[sanitize] FAILED: $lib does not link libasan" >&2; exit 1; }
export LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}"
# detect_leaks=0: CPython and torch (uninstrumented) keep allocations alive until exit by
#   design (interned objects, registries, the op library itself), which LeakSanitizer would
#   report as leaks at every interpreter exit; leaks are not what this check is for.
# abort_on_error=1: a report ends the process with SIGABRT (status 134), also in the test's
#   subprocesses, so it cannot pass for an ordinary test failure or go unnoticed.
# halt_on_error=1 (ASan's default, spelled out): the first report stops the run.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
# print_stacktrace=1: UBSan reports show where, not only what.
# halt_on_error=1: stop at the first report (also compiled in: -fno-sanitize-recover=all).
# abort_on_error=1: as for ASan, status 134, and Python's fault handler names the test.
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1"
# The instrumented copy first; -P (below) keeps the source tree (torch_adagrad8/ without the
# library) off sys.path.
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ left in the source tree's tests/
unset ADAGRAD8_NO_VBMI ADAGRAD8_CODE_SEARCH  # the runs below set the kernel choices themselves

# ---- 3. the tests, under each CPU kernel variant (ops_cpu.cpp picks one from
# at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
caps=(default avx2)
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
if [[ " $flags " == *" avx512f "* && " $flags " == *" avx512bw "* && " $flags " == *" avx512vl "* \
      && " $flags " == *" avx512dq "* ]]; then
  caps+=(avx512)
fi
[[ " $flags " == *" avx2 "* ]] || caps=(default)
best=${caps[-1]}
# The kernels' tests run under every variant. Once, under the best variant: the tests of the
# checks (validate.cpp: the same code whatever the variant) from the ops and from the optimizers'
# entry points, the registrations (opcheck), the optimizers, state dicts (resumes in new
# processes) and concurrent steps, and the variant-comparison test (it starts a process per
# variant itself). Not run: test_maps (reaches no C++ of this package), test_compile (Inductor
# compiles), test_bitsandbytes and test_accuracy (comparisons with bitsandbytes and long training
# runs on large tensors: no kernel path the op tests miss), test_cuda, and test_huge_tensors
# (multi-GiB tensors: memory- and time-hungry under ASan).
kernel_tests=(tests/test_numerics.py tests/test_properties.py tests/test_stochastic.py)
once_tests=(tests/test_bad_input.py tests/test_opcheck.py tests/test_bad_entry_points.py tests/test_optimizer.py
            tests/test_state_dict.py tests/test_reliability.py)
# tests that start their own process per kernel variant: run once, under the best variant
once_only=()
for t in test_instruction_sets_give_identical_bits test_instruction_set_the_cpu_lacks_falls_back; do
  once_only+=(--deselect "tests/test_numerics.py::$t")
done

# The pytest driver. In the pytest process itself: the imported torch_adagrad8 must be the
# instrumented copy, with the ASan runtime loaded, running the variant asked for.
# --capture=sys: pytest captures Python's output only, not the file descriptors, so a
# sanitizer's report (written to fd 2, just before the process aborts) reaches the log.
cat > "$build/run_pytest.py" <<'EOF'
import sys
from pathlib import Path

import torch
import torch_adagrad8  # noqa: F401
from torch_adagrad8 import _ops

site, cap = Path(sys.argv[1]).resolve(), sys.argv[2]
lib = Path(_ops._LIBRARY).resolve()
if site not in lib.parents:
    sys.exit(f"[sanitize] FAILED: torch_adagrad8 loaded {lib}, not the instrumented copy under {site}")
if "libasan" not in Path("/proc/self/maps").read_text():
    sys.exit("[sanitize] FAILED: the ASan runtime is not loaded in this process")
if torch.backends.cpu.get_cpu_capability() != cap.upper():
    sys.exit(f"[sanitize] FAILED: ATEN_CPU_CAPABILITY={cap} but torch runs {torch.backends.cpu.get_cpu_capability()}")
import pytest  # noqa: E402

sys.exit(pytest.main(["-p", "no:cacheprovider", "--capture=sys", "-q", *sys.argv[3:]]))
EOF

run_pytest() {
  local cap=$1; shift
  echo "[sanitize] ATEN_CPU_CAPABILITY=$cap: $*"
  local t0=$SECONDS status=0
  ATEN_CPU_CAPABILITY=$cap "$py" -P "$build/run_pytest.py" "$site" "$cap" "$@" || status=$?
  if [ "$status" != 0 ]; then
    [ "$status" = 134 ] && echo "[sanitize] the process aborted: a sanitizer report is above" >&2
    echo "[sanitize] FAILED under ATEN_CPU_CAPABILITY=$cap (exit $status)" >&2
    exit 1
  fi
  echo "[sanitize] ATEN_CPU_CAPABILITY=$cap: passed in $((SECONDS - t0)) s"
}

total=$SECONDS
for cap in "${caps[@]}"; do
  if [ "$cap" = "$best" ]; then
    run_pytest "$cap" "${kernel_tests[@]}" "${once_tests[@]}" "$@"
  else
    run_pytest "$cap" "${kernel_tests[@]}" "${once_only[@]}" "$@"
  fi
done
# Under avx512, ops_cpu.cpp picks the kernels with byte permutes where the CPU has AVX512-VBMI, and
# finds codes by gathers or by register permutes as suits the CPU (the runs above). Also: each way of
# finding codes (ADAGRAD8_CODE_SEARCH) with those kernels, and the plain AVX512 kernels
# (ADAGRAD8_NO_VBMI) with the CPU's own way.
if [[ "$best" == avx512 ]]; then
  for search in permute gather; do
    echo "[sanitize] ADAGRAD8_CODE_SEARCH=$search"
    (export ADAGRAD8_CODE_SEARCH=$search
     run_pytest avx512 "${kernel_tests[@]}" "${once_only[@]}" "$@") || exit 1
    caps+=("avx512 with $search")
  done
  if [[ " $flags " == *" avx512vbmi "* ]]; then
    echo "[sanitize] ADAGRAD8_NO_VBMI=1: the plain AVX512 kernels"
    (export ADAGRAD8_NO_VBMI=1; run_pytest avx512 "${kernel_tests[@]}" "${once_only[@]}" "$@") || exit 1
    caps+=("avx512 without VBMI")
  fi
fi
echo "[sanitize] clean under ASan and UBSan (${caps[*]}): tests took $((SECONDS - total)) s"
