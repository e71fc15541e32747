"""torch.library.opcheck over a sample matrix of every op."""

from __future__ import annotations

import pytest
import torch

from conftest import DTYPES, KINDS, OPTIONS, ROUNDING, SIZES, make_case

UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
         "test_aot_dispatch_dynamic")

def samples():
    for kind in KINDS:
        for dtype in DTYPES:
            for sizes in SIZES:
                yield pytest.param(kind, dtype, sizes, {}, id=f"{kind}-{dtype}-{sizes}")
        for options in OPTIONS + (ROUNDING if kind != "fp32" else []):
            yield pytest.param(kind, torch.bfloat16, [(300,), (17,)], options, id=f"{kind}-{options}")


@pytest.mark.parametrize("kind,dtype,sizes,options", list(samples()))
def test_opcheck(kind, dtype, sizes, options):
    case = make_case(sizes, dtype, kind, **options)
    torch.library.opcheck(case.overload, case.args, case.kwargs, test_utils=UTILS)
    # validate / validate.quantized take the same arguments and write nothing.
    validate = torch.ops.adagrad8.validate.default if kind == "fp32" else torch.ops.adagrad8.validate.quantized
    torch.library.opcheck(validate, case.args, case.kwargs, test_utils=UTILS)


def clip_args(dtype, sizes, step, fresh):
    """percentile_clip inputs: some histories fresh (NO_HISTORY), the others partly filled."""
    gen = torch.Generator().manual_seed(len(sizes))
    grads = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    vecs = [torch.full((100,), -1.0) if fresh else torch.rand(100, generator=gen) * 50 for _ in sizes]
    return grads, vecs, [torch.tensor(float(step)) for _ in sizes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[(300,), (17,)], [(0,), (64, 65)], []], ids=str)
@pytest.mark.parametrize("step,fresh,percentile", [(1, True, 90), (7, False, 5), (150, False, 99), (42, True, 50)],
                         ids=str)
def test_opcheck_percentile_clip(dtype, sizes, step, fresh, percentile):
    grads, vecs, steps = clip_args(dtype, sizes, step, fresh)
    torch.library.opcheck(torch.ops.adagrad8.percentile_clip.default, (grads, vecs, steps, percentile),
                          test_utils=UTILS)


@pytest.mark.parametrize("named", [False, True])
def test_opcheck_validate_overlaps(named):
    """validate.overlaps over tensors that are allowed: disjoint written ones, read-only ones that
    share memory, an empty tensor inside a written one."""
    base = torch.randn(100)
    written, read = [base[:40], torch.randn(3), base[40:40]], [base[50:], base[60:70], torch.randn(())]
    names = [f"t{i}" for i in range(6)] if named else []
    torch.library.opcheck(torch.ops.adagrad8.validate.overlaps, (written, read, names), test_utils=UTILS)


@pytest.mark.parametrize("shapes", [[], [()], [(), (1,), ()], [()] * 40], ids=["none", "one", "three", "forty"])
def test_opcheck_increment(shapes):
    counts = [torch.full(s, float(i), dtype=torch.float32) for i, s in enumerate(shapes)]
    torch.library.opcheck(torch.ops.adagrad8.increment.default, (counts,), test_utils=UTILS)
