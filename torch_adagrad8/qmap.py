"""Quantization maps (ALGORITHM.md §3) and the pure-PyTorch quantize/dequantize rules (§4).

These functions define the 8-bit encoding; the C++/CUDA kernels implement the same rules
(csrc/include/adagrad8/quant.h) and tests hold them bit-identical.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAP_SIZE = 256


def dynamic_map(signed: bool = False) -> Tensor:
    """bitsandbytes' dynamic map (max_exponent_bits=7, total_bits=8), bit for bit.

    Each decade 10**(i-6), i = 0..6, holds the midpoints of a float32 linspace(0.1, 1, n);
    the unsigned map spends the sign bit on twice as many fractions per decade.
    """
    parts = []
    for i in range(7):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = (10 ** (i - 6)) * means
        parts += [decade, -decade] if signed else [decade]
    parts.append(torch.tensor([0.0, 1.0]))
    values = torch.sort(torch.cat(parts)).values
    assert values.numel() == MAP_SIZE
    return values


def signed_map() -> Tensor:
    """The map bitsandbytes stores Adagrad state with (code 127 is 0.0)."""
    return dynamic_map(signed=True)


def unsigned_map() -> Tensor:
    """bitsandbytes' unsigned dynamic map: all 256 codes cover [0, 1] (code 0 is 0.0)."""
    return dynamic_map(signed=False)


# tapered_map's spacing: relative gap TAPER_GAP / sqrt(x) below a code x, at most TAPER_MAX_GAP.
# Chosen by tools/quality.py's protocols A and B (docs/accuracy.md).
TAPER_GAP = 0.0085
TAPER_MAX_GAP = 1.5


def tapered_map() -> Tensor:
    """The default map for new state: 0, then codes from 1.0 downwards, each the one above
    divided by 1 + min(TAPER_GAP / sqrt(x), TAPER_MAX_GAP).

    Near the top the codes are evenly spaced in sqrt(x) (0.85% apart at 1.0, 2.7% at 0.1), where
    the accumulators of dense gradients sit; further down the gaps widen to a constant ratio of
    2.5, so the codes reach 2.7e-10 and a rarely seen row's accumulator is not rounded to 0 next
    to a block-mate 10^8 times larger. Python floats with sqrt and division only (correctly
    rounded everywhere), rounded once to float32: the same bits on every platform.
    """
    values = [1.0]
    while len(values) < MAP_SIZE - 1:
        x = values[-1]
        values.append(x / (1.0 + min(TAPER_GAP / math.sqrt(x), TAPER_MAX_GAP)))
    return torch.tensor([0.0] + values[::-1], dtype=torch.float32)


# The maps known by name (the optimizers' qmap option). "unsigned" is the name the dynamic
# map had while it was the default.
MAPS = {"tapered": tapered_map, "dynamic": unsigned_map, "unsigned": unsigned_map, "signed": signed_map}
DEFAULT_MAP = "tapered"


def scale_count(numel: int, block_size: int) -> int:
    """Number of float32 scales of a tensor: one per block, or one per tensor (block_size 0)."""
    return 1 if block_size == 0 else -(-numel // block_size)


def same_blocks(numel: int, a: int, b: int) -> bool:
    """Whether block sizes a and b (0: one per tensor) split a tensor of numel elements into the
    same blocks: the same size, or a single block under both."""
    count = scale_count(numel, a)
    return a == b or (count == scale_count(numel, b) and count <= 1)


def block_scales(values: Tensor, block_size: int) -> Tensor:
    """Largest finite |value| of each block of the flattened tensor (NaN/Inf count as 0)."""
    flat = values.reshape(-1).float()
    size = min(block_size, max(flat.numel(), 1)) if block_size > 0 else max(flat.numel(), 1)  # never padded past one block
    blocks = scale_count(flat.numel(), block_size)
    magnitude = torch.where(torch.isfinite(flat), flat.abs(), 0.0)
    padded = torch.nn.functional.pad(magnitude, (0, blocks * size - flat.numel()))
    return padded.view(blocks, size).amax(dim=1) if blocks > 0 else padded.new_zeros(0)


def per_element(scales: Tensor, numel: int, block_size: int) -> Tensor:
    """The scale of each element's block, as a flat tensor of numel values."""
    if block_size == 0 or block_size >= numel:  # one block (a saved block size may be huge)
        return scales.expand(numel)
    return scales.repeat_interleave(block_size)[:numel]


def normalize(values: Tensor, scale: Tensor) -> Tensor:
    """values / scale, or values unchanged where the scale is 0 (an all-zero block)."""
    return torch.where(scale > 0, values / scale, values)


def nearest_codes(x: Tensor, qmap: Tensor) -> Tensor:
    """Round to nearest: the number of midpoints below x; exact midpoints go to the even code.

    NaN and +Inf give 255.
    """
    mid = (qmap[:-1] + qmap[1:]) * 0.5
    code = torch.searchsorted(mid, x.contiguous())
    on_mid = (code < MAP_SIZE - 1) & (x == mid[code.clamp(max=MAP_SIZE - 2)]) & (code % 2 == 1)
    code = torch.where(on_mid, code + 1, code)
    return torch.where(torch.isnan(x), MAP_SIZE - 1, code).to(torch.uint8)


def stochastic_codes(x: Tensor, qmap: Tensor, u: Tensor) -> Tensor:
    """Stochastic rounding: up from the code below x with probability (x - below) / (above - below).

    u holds one uniform number in [0, 1) per element. NaN gives 255.
    """
    lo = torch.searchsorted(qmap[1:].contiguous(), x.contiguous(), right=True).clamp(max=MAP_SIZE - 2)
    below = qmap[lo]
    frac = (x - below) / (qmap[lo + 1] - below)
    code = torch.where(u < frac, lo + 1, lo)
    return torch.where(torch.isnan(x), MAP_SIZE - 1, code).to(torch.uint8)


def quantize(values: Tensor, qmap: Tensor, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """Encode a tensor with round-to-nearest: returns (codes shaped like values, scales)."""
    scales = block_scales(values, block_size)
    flat = values.reshape(-1).float()
    x = normalize(flat, per_element(scales, flat.numel(), block_size))
    return nearest_codes(x, qmap).view(values.shape), scales


def dequantize(codes: Tensor, scales: Tensor, qmap: Tensor, block_size: int = 256) -> Tensor:
    """Decode to float32: qmap[code] * the scale of the code's block."""
    flat = qmap[codes.reshape(-1).long()] * per_element(scales, codes.numel(), block_size)
    return flat.view(codes.shape)
