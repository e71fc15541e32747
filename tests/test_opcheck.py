"""torch.library.opcheck over a sample matrix of both overloads."""

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
