"""The CUDA kernels of csrc/cuda/kernels.cu, run on the CPU.

No GPU is lent to CI, so the real kernels only run where a GPU exists (test_cuda.py). Here the
kernel source is compiled as C++ against tests/cuda_emulation/emu.h, which gives every CUDA
thread of a block its own std::thread, and stepped through csrc/cuda's own launchers. That checks
on every run what the per-element headers cannot: the split of tensors into units, scale blocks
and thread groups, the grid-stride loops (also with the grid capped at 3 blocks, run in reverse
order), the block reductions, the large-block phases, and the vector accesses. Every written
tensor must equal the CPU kernel's bit for bit (NaN payloads aside), no vector access may be
misaligned, and the number of vector accesses must be what the kernels' design gives: every
whole chunk of 4 elements of an aligned tensor, none of a misaligned one. What the emulation
does not cover is listed in emu.h.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import DTYPES, KINDS, OFFSET_LAYOUTS, Case, assert_same, make_case, with_lists_offset

ROOT = Path(__file__).resolve().parents[1]
EMULATION = Path(__file__).parent / "cuda_emulation"
# kMaxGrid, and whether blocks run in reverse: a grid of 3 makes every block walk many units
BUILDS = ((3, True), (65536, False))
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # kernels.cuh's Dtype
ALL_OPTIONS = dict(weight_decay=0.1, lr_decay=0.05, maximize=True, skip_zeros=True, gnorm=True)


def emulated_source(max_grid: int) -> str:
    """kernels.cu with its launches, grid cap and vector accesses routed through emu.h."""
    source = (ROOT / "csrc" / "cuda" / "kernels.cu").read_text()
    rewrites = [
        (r"(\w+<T>)<<<([^>]+), kThreads, 0, stream>>>\(", r"emu_launch(\2, kThreads, \1, ", 4),
        (r"constexpr int64_t kMaxGrid = \d+;", f"constexpr int64_t kMaxGrid = {max_grid};", 1),
        (r"reinterpret_cast<(const )?Vec<T>\*>\(p \+ i\)", r"emu_vector<\1Vec<T>>(p + i)", 2),
    ]
    for pattern, replacement, expected in rewrites:
        source, found = re.subn(pattern, replacement, source)
        assert found == expected, f"kernels.cu no longer has {expected} of {pattern!r} ({found}): update this test"
    assert not re.search(r"reinterpret_cast<[^>]*Vec", source), "a vector access that emu_vector does not see"
    return source


def build(out: Path, max_grid: int, reversed_blocks: bool) -> ctypes.CDLL:
    (out / "kernels.cpp").write_text(emulated_source(max_grid))
    compiler = shlex.split(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "")
    assert compiler, "no C++ compiler (the package's own build needs one too)"
    library = out / "libemulated.so"
    command = [*compiler, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-ffp-contract=off",
               "-fvisibility=hidden", *(["-DEMU_BLOCKS_REVERSED"] if reversed_blocks else []),
               "-include", str(EMULATION / "emu.h"), "-I", str(EMULATION / "include"), "-I", str(ROOT / "csrc"),
               "-I", str(ROOT / "csrc" / "include"), "-I", str(Path(torch.__file__).parent / "include"),
               str(out / "kernels.cpp"), str(EMULATION / "bridge.cpp"), "-o", str(library)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    numel = ctypes.POINTER(ctypes.c_int64)
    scalars = [ctypes.c_void_p, ctypes.c_double, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.emu_step.argtypes = [ctypes.c_int, ctypes.c_int, *[ptrs] * 5, numel, *scalars]
    lib.emu_step_quantized.argtypes = [ctypes.c_int, ctypes.c_int, *[ptrs] * 7, numel, ctypes.c_int64,
                                       ctypes.c_void_p, *scalars]
    lib.emu_counts.restype = ctypes.c_long
    return lib


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> list[ctypes.CDLL]:
    return [build(tmp_path_factory.mktemp(f"emulated_grid{grid}"), grid, rev) for grid, rev in BUILDS]


def _pointers(tensors, n: int):
    tensors = tensors if tensors is not None else [None] * n
    return (ctypes.c_void_p * n)(*[t.data_ptr() if t is not None and t.numel() else None for t in tensors])


def run_emulated(lib: ctypes.CDLL, case: Case) -> tuple[int, int]:
    """Steps case's tensors in place through the emulated kernels; returns the vector accesses
    made and how many of them were misaligned."""
    before = [lib.emu_counts(0), lib.emu_counts(1)]
    a, k = case.args, case.kwargs
    n = len(a[0])
    numel = (ctypes.c_int64 * n)(*[t.numel() for t in a[0]])
    scalars = (k["lr"].data_ptr(), k["lr_decay"], k["weight_decay"], k["eps"], k["maximize"], k["skip_zeros"])
    dtype = DTYPE_CODE[a[0][0].dtype]
    if case.kind == "fp32":
        params, grads, sums, steps = a
        lib.emu_step(dtype, n, *(_pointers(x, n) for x in (params, grads, sums, steps, k["gnorm_scales"])),
                     numel, *scalars)
    else:
        params, grads, codes, absmax, qmap, steps = a
        lists = (params, grads, codes, absmax, steps, k["gnorm_scales"], k["seeds"])
        lib.emu_step_quantized(dtype, n, *(_pointers(x, n) for x in lists), numel, k["block_size"],
                               qmap.data_ptr(), *scalars)
    return lib.emu_counts(0) - before[0], lib.emu_counts(1) - before[1]


def expected_vector_accesses(case: Case) -> int:
    """Vector accesses the kernels make on case's tensors, all aligned, without skip_zeros: per whole
    chunk of 4 elements, the fp32 kernel loads grad, param and sum and stores sum and param (5);
    the 8-bit kernels load grad and codes to find the scale (and the param, with weight decay),
    then load grad, param and codes and store param and codes (7 or 8). A scale block that starts
    mid-chunk moves element by element."""
    assert not case.kwargs["skip_zeros"]
    numels = [p.numel() for p in case.args[0]]
    if case.kind == "fp32":
        return 5 * sum(n // 4 for n in numels)
    per_chunk = 7 + (case.kwargs["weight_decay"] != 0)
    chunks = 0
    for n in numels:
        block = min(case.kwargs["block_size"] or n, n)
        if n:
            chunks += sum(min(block, n - start) // 4 for start in range(0, n, block) if start % 4 == 0)
    return per_chunk * chunks


def check(emulated, case: Case, lists=(), offset: int = 0) -> None:
    """Each emulated build steps a copy of case (argument lists `lists` placed `offset` elements
    into their buffers) and must write what the CPU kernel writes, with as many vector accesses
    as the design gives (none when a list is misaligned) and none misaligned."""
    expected = case.clone().run()
    aligned = offset % 4 == 0  # a vector is 4 elements of any dtype
    # With skip_zeros, chunks of zero gradients skip their params (grads always move): at most this.
    design = expected_vector_accesses(Case(case.kind, case.args, dict(case.kwargs, skip_zeros=False)))
    for lib in emulated:
        mine = case.clone()
        mine.args = with_lists_offset(mine.args, lists, offset)
        vector, misaligned = run_emulated(lib, mine)
        assert misaligned == 0
        assert_same(mine, expected)
        if not aligned:
            assert vector == 0
        elif case.kwargs["skip_zeros"]:
            assert vector <= design and (vector > 0) == (design > 0)
        else:
            assert vector == design


SIZES = [(1,), (257,), (4097,), [(3, 5), (1,), (700,), (0,), (33,)]]
NO_SKIP = dict(weight_decay=0.1, lr_decay=0.05, maximize=True, gnorm=True)


@pytest.mark.parametrize(("kind", "options"), [(kind, options) for kind in KINDS for options in
                                                [dict(), ALL_OPTIONS, dict(ALL_OPTIONS, stochastic=True),
                                                 dict(NO_SKIP, stochastic=True, signed=True)]
                                                if kind != "fp32" or not options.get("stochastic")], ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cuda_matches_cpu(emulated, kind, dtype, sizes, options):
    check(emulated, make_case(sizes, dtype, kind, **options))


@pytest.mark.parametrize("kind", KINDS)
def test_emulated_cuda_batches_of_tensors_match_cpu(emulated, kind):
    """40 tensors: more than one launch's batch of 32."""
    check(emulated, make_case([(5,)] * 39 + [(300,)], torch.float32, kind, **ALL_OPTIONS))


@pytest.mark.parametrize("options", [dict(), dict(ALL_OPTIONS, stochastic=True)], ids=str)
@pytest.mark.parametrize(("block_size", "dtype"), [(size, (torch.float16, torch.bfloat16)[i % 2]) for i, size in
                                                   enumerate([1, 3, 6, 64, 130, 256, 4096, 4099, 40_000])], ids=str)
def test_emulated_cuda_block_sizes_match_cpu(emulated, dtype, block_size, options):
    """Blocks off the vector width start mid-vector; blocks over 4096 take the three-phase path."""
    check(emulated, make_case([(10_007,), (513,)], dtype, "blockwise", block_size=block_size, **options))


@pytest.mark.parametrize(("lists", "offset"), OFFSET_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_emulated_cuda_misaligned_tensors(emulated, kind, dtype, lists, offset):
    """A tensor whose address is off its vector size turns the vector path off (one misaligned
    list is enough); 4 elements in, every access is aligned again."""
    check(emulated, make_case([(1000,), (4097,), (3,)], dtype, kind, **NO_SKIP), lists, offset)
