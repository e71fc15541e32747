"""CUDA: kernels registered exactly when the library was built with them; CUDA numerics equal
the CPU kernel's bit for bit (those run only where a GPU is present)."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import DTYPES, KINDS, Case, assert_same, make_case
from torch_adagrad8 import _build_info, _ops

OPS = (_ops.STEP, _ops.STEP_QUANTIZED)
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
    if os.environ.get("ADAGRAD8_EXPECT_CUDA") == "1":  # set by tools/test.sh for the CUDA build
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


def _compare(case: Case) -> None:
    cpu = case.clone().run()
    gpu = _on(case, "cuda").run()
    torch.cuda.synchronize()
    assert_same(cpu, _on(gpu, "cpu"))


@needs_gpu
@pytest.mark.parametrize("sizes", [(1,), (255,), (257,), (100_003,), [(3, 5), (1,), (700,), (0,), (4097,)]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind, dtype, sizes):
    _compare(make_case(sizes, dtype, kind))


@needs_gpu
@pytest.mark.parametrize("block_size", [1, 64, 256, 2048, 40_000])
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
