"""torch.library.opcheck over a sample matrix of both overloads."""

from __future__ import annotations

import pytest
import torch

from conftest import DTYPES, KINDS, make_case

UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
         "test_aot_dispatch_dynamic")
SIZES = [(1,), (255,), (256,), (257,), (4096,), (100_003,), [(3, 5), (1,), (700,), (64, 65), (33,)]]
OPTIONS = [
    dict(weight_decay=0.1),
    dict(lr_decay=0.01),
    dict(maximize=True),
    dict(skip_zeros=True),
    dict(gnorm=True),
    dict(stochastic=True),
    dict(stochastic=True, signed=True, block_size=64, weight_decay=0.1, lr_decay=0.01, maximize=True,
         skip_zeros=True, gnorm=True),
]


def samples():
    for kind in KINDS:
        for dtype in DTYPES:
            for sizes in SIZES:
                yield pytest.param(kind, dtype, sizes, {}, id=f"{kind}-{dtype}-{sizes}")
        for options in OPTIONS:
            if options.get("stochastic") and kind == "fp32":
                continue  # stochastic rounding is an 8-bit option
            yield pytest.param(kind, torch.bfloat16, [(300,), (17,)], options, id=f"{kind}-{options}")


@pytest.mark.parametrize("kind,dtype,sizes,options", list(samples()))
def test_opcheck(kind, dtype, sizes, options):
    case = make_case(sizes, dtype, kind, **options)
    torch.library.opcheck(case.overload, case.args, case.kwargs, test_utils=UTILS)
