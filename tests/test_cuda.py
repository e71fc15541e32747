"""CUDA: kernels registered exactly when the library was built with them; CUDA numerics equal
the CPU kernel's bit for bit (those run only where a GPU is present)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import DTYPES, KINDS, OFFSET_LAYOUTS, Case, assert_same, make_case, with_lists_offset
from torch_adagrad8 import _build_info, _ops

OPS = (_ops.STEP, _ops.STEP_QUANTIZED)
EXPECT_CUDA = os.environ.get("ADAGRAD8_EXPECT_CUDA") == "1"  # set by tools/test.sh for the CUDA build
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="executes CUDA kernels: needs a GPU")


def _cuda_kernel_source(op: str) -> str:
    """Where the op's CUDA kernel was registered, from the dispatcher's own table."""
    lines = [line for line in torch._C._dispatch_dump(op).splitlines() if line.startswith("CUDA:")]
    return lines[0] if lines else ""


def test_native_cuda_kernels_registered_iff_built_with_cuda():
    for op in OPS:
        source = _cuda_kernel_source(op)
        assert source, f"{op} has no CUDA kernel at all"
        assert ("ops_cuda.cpp" in source) == _build_info.WITH_CUDA, source
        if not _build_info.WITH_CUDA:
            assert "cuda" in _ops.REFERENCE_DEVICES  # reference.py serves CUDA tensors instead
    if EXPECT_CUDA:
        assert _build_info.WITH_CUDA and torch.version.cuda is not None
        assert _build_info.CUDA_ARCH_LIST


def _moved(x, device: str):
    """x (a tensor, a list of them, or anything else) on device."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, list):
        return [_moved(v, device) for v in x]
    return x


def _on(case: Case, device: str) -> Case:
    return Case(case.kind, tuple(_moved(a, device) for a in case.args),
                {k: _moved(v, device) for k, v in case.kwargs.items()})


def _compare(case: Case, lists=(), offset: int = 0) -> None:
    """The CUDA kernels write what the CPU kernel writes; argument lists `lists` (0: params,
    1: grads, 2: sums or codes) are placed `offset` elements into their buffers."""
    cpu = case.clone().run()
    gpu = _on(case, "cuda")
    gpu.args = with_lists_offset(gpu.args, lists, offset, "cuda")
    gpu.run()
    torch.cuda.synchronize()
    assert_same(cpu, _on(gpu, "cpu"))


@needs_gpu
@pytest.mark.parametrize("sizes", [(1,), (255,), (257,), (100_003,), [(3, 5), (1,), (700,), (0,), (4097,)]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind, dtype, sizes):
    _compare(make_case(sizes, dtype, kind))


@needs_gpu
@pytest.mark.parametrize("block_size", [1, 6, 64, 130, 256, 2048, 4099, 40_000])  # 6, 130, 4099: off the vector width
@pytest.mark.parametrize("options", [dict(), dict(stochastic=True), dict(weight_decay=0.1, lr_decay=0.01, maximize=True,
                                                                          skip_zeros=True, gnorm=True, signed=True)],
                         ids=str)
def test_cuda_quantized_options_match_cpu(block_size, options):
    _compare(make_case([(100_003,), (513,)], torch.bfloat16, "blockwise", block_size=block_size, **options))
    _compare(make_case([(100_003,), (513,)], torch.float32, "tensorwise", **options))


@needs_gpu
def test_cuda_non_finite_gradient_matches_cpu():
    for kind in KINDS:
        case = make_case([(1000,)], torch.float32, kind)
        case.args[1][0][10] = float("nan")
        case.args[1][0][500] = float("inf")
        _compare(case)


@needs_gpu
@pytest.mark.parametrize(("lists", "offset"), OFFSET_LAYOUTS)
@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.1, skip_zeros=True, stochastic=True)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_misaligned_tensors_match_cpu(kind, dtype, options, lists, offset):
    """A tensor whose address is off its vector size turns the vector path off (one misaligned
    list is enough; on a GPU a misaligned vector access faults); 4 elements in, it is on again."""
    if kind == "fp32" and options.get("stochastic"):
        options = dict(options, stochastic=False)
    _compare(make_case([(1000,), (4097,), (3,)], dtype, kind, **options), lists, offset)


# ---- the compiled machine code (no GPU needed) ---------------------------------------------

def _cuobjdumps() -> list[str]:
    """cuobjdump from a CUDA toolkit on PATH, and the copy that the CUDA torch wheels' triton ships."""
    found = [shutil.which("cuobjdump")]
    try:
        import triton

        found.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return [tool for tool in found if tool and Path(tool).exists()]


def _dump(*flags: str) -> str:
    """cuobjdump's listing of the built library, from the first cuobjdump that reads it (an older
    toolkit's may not know the newest architectures)."""
    errors = []
    for tool in _cuobjdumps():
        done = subprocess.run([tool, *flags, str(_ops._LIBRARY)], capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout
        errors.append(f"{tool}: {done.stderr.strip()[-500:]}")
    if EXPECT_CUDA:
        pytest.fail(f"no cuobjdump could read the library, but this is the CUDA build's run: {errors}")
    pytest.skip(f"no usable cuobjdump: {errors}")


# A kernel's mangled name: which kernel, and its element type (float, __half, __nv_bfloat16).
_KERNEL = r"(fp32_kernel|quant_small_kernel|quant_max_kernel|quant_write_kernel)I(f|6__half|13__nv_bfloat16)E"


def _per_kernel(dump: str, line_pattern: str) -> dict[tuple[str, str, str], list[str]]:
    """Lines matching line_pattern under each (arch, kernel, element type) of a cuobjdump listing."""
    out: dict[tuple[str, str, str], list[str]] = {}
    arch = key = None
    for line in dump.splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.search(r"Function\s*:?\s*(\S+?):?\s*$", line):
            kernel = re.search(_KERNEL, m.group(1))
            key = (arch, kernel.group(1), kernel.group(2)) if kernel else None
            if key:
                out[key] = []
        elif key and re.search(line_pattern, line):
            out[key].append(line)
    return out


@pytest.mark.skipif(not _build_info.WITH_CUDA, reason="the library was built without CUDA kernels")
def test_cuda_kernels_never_spill():
    """No kernel, on any architecture built, uses a stack or local memory (no register spills)."""
    usage = _per_kernel(_dump("--dump-resource-usage"), r"REG:")
    archs = {arch for arch, _, _ in usage}
    assert archs and len(usage) == 12 * len(archs), sorted(usage)  # 4 kernels x 3 element types, every arch
    for key, lines in usage.items():
        assert re.search(r"STACK:0 ", lines[0]) and re.search(r"LOCAL:0\b", lines[0]), (key, lines[0])


@pytest.mark.skipif(not _build_info.WITH_CUDA, reason="the library was built without CUDA kernels")
def test_cuda_kernels_move_whole_vectors():
    """Grads and params move as 16-byte (fp32) or 8-byte (fp16/bf16: 4 elements) accesses, fp32 state
    sums as 16-byte ones, in every kernel on every architecture built (kernels.cu: kVec = 4).
    Lower bounds on counts of access widths: a smoke test that the vector path is compiled in, not
    a proof that every access uses it (4-byte code words look like any 32-bit access)."""
    sass = _per_kernel(_dump("-sass"), r"\b(LDG|STG)\.")
    assert sass
    for (arch, kernel, etype), lines in sass.items():
        width = Counter()
        for line in lines:  # e.g. "LDG.E.128", "LDG.E.128.SYS", "STG.E.EL.64": the width is a part
            op, *parts = re.search(r"\b((?:LDG|STG)(?:\.[A-Z0-9_]+)*)", line).group(1).split(".")
            width[op, next((w for w in parts if w in ("64", "128")), "32")] += 1
        elem = "128" if etype == "f" else "64"  # 4 params or grads
        loads = {"fp32_kernel": 2, "quant_small_kernel": 2, "quant_write_kernel": 2, "quant_max_kernel": 1}[kernel]
        if elem == "64" and kernel in ("quant_small_kernel", "quant_write_kernel"):
            loads += 1  # these also load the int64 seed, 8 bytes
        assert width["LDG", elem] >= loads, (arch, kernel, etype, width)  # grad and param (the max pass: grad)
        if kernel != "quant_max_kernel":
            assert width["STG", elem] >= 1, (arch, kernel, etype, width)  # param
        if kernel == "fp32_kernel":
            sums = 1 if etype == "f" else 0  # fp32 params and grads move in 16 bytes too
            assert width["LDG", "128"] >= 1 + 2 * sums and width["STG", "128"] >= 1 + sums, (arch, etype, width)

