"""Stochastic rounding: unbiased within a statistical bound, and reproducible from its seed."""

from __future__ import annotations

import math

import pytest
import torch

from torch_adagrad8 import _ops, qmap as Q

N = 200_001


def _quantize_by_step(value: float, seed: int, step: float = 1.0, qmap=None):
    """One step on a tensor-wise 8-bit state from zero: element 0 fixes the scale at 1, every other
    element's new accumulator is g*g ~ value, so its code is a stochastic rounding of that value."""
    qmap = Q.unsigned_map() if qmap is None else qmap
    grads = torch.full((N,), math.sqrt(value))
    grads[0] = 1.0
    codes = torch.zeros(N, dtype=torch.uint8)
    absmax = torch.zeros(1)
    _ops.step_quantized([torch.zeros(N)], [grads], [codes], [absmax], qmap, [torch.tensor(step)], torch.tensor(0.1),
                        block_size=0, seeds=[torch.tensor(seed)])
    assert absmax.item() == 1.0
    return codes[1:], float(grads[1] * grads[1]), qmap


@pytest.mark.parametrize("map_name", ["dynamic", "tapered"])
def test_mean_is_unbiased(map_name):
    for value in (3e-7 + 1e-8, 0.0123, 0.3, 0.77, 0.9999):
        codes, x, qmap = _quantize_by_step(value, seed=42, qmap=Q.MAPS[map_name]())
        lo = qmap[codes.long()].min().item()
        hi = qmap[codes.long()].max().item()
        assert codes.unique().numel() <= 2, "rounds only to the two neighbours of x"
        assert lo <= x <= hi
        mean = qmap[codes.long()].double().mean().item()
        # Bernoulli between lo and hi: std of the mean = sqrt((x - lo)(hi - x) / n); allow 5 sigma.
        bound = 5 * math.sqrt(max((x - lo) * (hi - x), 0.0) / codes.numel()) + 1e-12
        assert abs(mean - x) <= bound, (value, mean, x, bound)
        # round-to-nearest on the same value is biased by design; stochastic is not
        frac = (x - lo) / (hi - lo) if hi > lo else 0.0
        up = (qmap[codes.long()] == hi).double().mean().item()
        assert abs(up - frac) <= 5 * math.sqrt(frac * (1 - frac) / codes.numel()) + 1e-12


def test_same_seed_same_codes_other_seed_or_step_other_codes():
    a, _, _ = _quantize_by_step(0.3, seed=7)
    b, _, _ = _quantize_by_step(0.3, seed=7)
    c, _, _ = _quantize_by_step(0.3, seed=8)
    d, _, _ = _quantize_by_step(0.3, seed=7, step=2.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_signed_map_is_unbiased_too():
    codes, x, qmap = _quantize_by_step(0.05, seed=3, qmap=Q.signed_map())
    mean = qmap[codes.long()].double().mean().item()
    lo, hi = qmap[codes.long()].min().item(), qmap[codes.long()].max().item()
    assert abs(mean - x) <= 5 * math.sqrt((x - lo) * (hi - x) / codes.numel())


@pytest.mark.parametrize("step", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 2.0**63, 2.0**62, -3.0])
def test_any_step_value_gives_the_reference_key(step):
    """Step values are not checked (reading them would sync): a NaN, infinite or huge one must
    still give a defined key, the reference's (converting it to int64 directly is undefined
    behaviour, which UBSan found in tools/sanitize.sh)."""
    from conftest import assert_same, make_case, reference_impl

    case = make_case([(3000,), (300,)], torch.float32, "blockwise", stochastic=True)
    case.args[5][0].fill_(step)
    ref = case.clone()
    case.run()
    ref.run(reference_impl("blockwise"))
    assert_same(case, ref)
