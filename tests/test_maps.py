"""Quantization maps equal bitsandbytes' (ALGORITHM.md §3) and the encoding rules hold."""

from __future__ import annotations

import hashlib

import torch

from torch_adagrad8 import qmap as Q


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def test_signed_map_check_values():
    q = Q.signed_map()
    assert q.dtype == torch.float32 and q.shape == (256,)
    assert q.unique().numel() == 256 and torch.all(q[1:] > q[:-1])
    assert q[127] == 0.0 and q.min().item() == torch.tensor(-0.992968738).item() and q.max() == 1.0
    assert _sha(q).startswith("e732639a65f497b4")


def test_unsigned_map_check_values():
    q = Q.unsigned_map()
    assert q.unique().numel() == 256 and torch.all(q[1:] > q[:-1])
    assert q[0] == 0.0 and q[-1] == 1.0
    expected = torch.tensor([3.25e-7, 7.75e-7], dtype=torch.float32)
    torch.testing.assert_close(q[1:3], expected, rtol=1e-6, atol=0)  # the check values are printed rounded
    torch.testing.assert_close(q[-2], torch.tensor(0.996484399), rtol=1e-7, atol=0)
    assert _sha(q).startswith("305f002cc11278fb")


def test_maps_equal_bitsandbytes():
    import bitsandbytes.functional as F  # installed by the test environment (tools/setup-env.sh)

    assert torch.equal(F.create_dynamic_map(signed=True), Q.signed_map())
    assert torch.equal(F.create_dynamic_map(signed=False), Q.unsigned_map())


def test_nearest_rounding_rules():
    q = Q.unsigned_map()
    mid = (q[:-1] + q[1:]) * 0.5
    # every code maps to itself; midpoints go to the even neighbour; NaN and Inf saturate
    assert torch.equal(Q.nearest_codes(q, q), torch.arange(256, dtype=torch.uint8))
    on_mid = Q.nearest_codes(mid, q).long()
    i = torch.arange(255)
    assert torch.equal(on_mid, torch.where(i % 2 == 0, i, i + 1))
    special = torch.tensor([float("nan"), float("inf"), 2.0, -1.0])
    assert Q.nearest_codes(special, q).tolist() == [255, 255, 255, 0]


def test_quantize_roundtrip_error_and_zero_blocks():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(10_000, generator=gen) ** 4
    x[:256] = 0  # one all-zero block
    for q in (Q.unsigned_map(), Q.signed_map(), Q.tapered_map()):
        codes, scales = Q.quantize(x, q, 256)
        assert scales[0] == 0 and torch.all(Q.dequantize(codes, scales, q, 256)[:256] == 0)
        back = Q.dequantize(codes, scales, q, 256)
        rel = ((back - x).abs() / Q.per_element(scales, x.numel(), 256).clamp_min(1e-30))[256:]
        assert rel.max() < 0.05  # half the coarsest gap near the block scale (dynamic maps), relative to it


def test_tapered_map_shape():
    """The default map: 0, then codes whose relative gaps follow the documented rule, reaching
    below 1e-9; no gap under 0.4%, so the CPU encoder's bucket table (buckets at most 0.4%
    wide) holds at most one midpoint per bucket above 2^-30 and never needs its search there."""
    q = Q.tapered_map()
    assert Q.MAPS[Q.DEFAULT_MAP] is Q.tapered_map
    assert q.dtype == torch.float32 and q.shape == (256,)
    assert torch.all(q[1:] > q[:-1]) and q[0] == 0.0 and q[-1] == 1.0
    assert 1e-10 < q[1] < 1e-9
    x = q[1:].double()
    gap = x[1:] / x[:-1] - 1
    rule = torch.clamp(Q.TAPER_GAP / x[1:].sqrt(), max=Q.TAPER_MAX_GAP)
    torch.testing.assert_close(gap, rule, rtol=1e-5, atol=1e-6)  # float32 rounding of the codes
    assert gap.min() > 0.004
    mid = ((q[:-1] + q[1:]) * 0.5).double()
    above = mid[mid >= 2.0**-30]
    bucket = (above.float().view(torch.int32) >> 15)  # exponent and 8 mantissa bits, as kernels.cpp
    assert bucket.unique().numel() == bucket.numel()
    assert _sha(q).startswith("4a019dc9c59d0f89")  # the same bits everywhere (sqrt and division only)
