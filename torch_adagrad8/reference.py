"""Both adagrad8 ops in plain PyTorch: the oracle for tests, and the kernel for devices that
have no native one.

Written op by op in the order of csrc/include/adagrad8 (ALGORITHM.md §2-§4, §6): each torch
op here is one correctly rounded float32 operation, so the native kernels match bit for bit.
Everything stays a tensor on the parameters' device: no host synchronisation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from torch_adagrad8 import _checks, qmap as Q

_M32 = 0xFFFFFFFF


def _i64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: Tensor) -> Tensor:
    """rng.h's mix64 on int64 tensors (wrapping arithmetic)."""
    z = z + _i64(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _i64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _i64(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def mix32(x: Tensor) -> Tensor:
    """rng.h's mix32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def step_index(step: Tensor) -> Tensor:
    """rng.h's step_index: the step count as int64, INT64_MIN where it is NaN or outside [-2^63, 2^63)."""
    s = step.reshape(())
    inside = (s >= -(2.0**63)) & (s < 2.0**63)
    return torch.where(inside, torch.where(inside, s, 0.0).long(), torch.iinfo(torch.int64).min)


def uniforms(seed: Tensor, step: Tensor, numel: int) -> Tensor:
    """rng.h's uniform_at for elements 0..numel-1 of one tensor at one step."""
    stream = mix64(seed.reshape(()).long() ^ mix64(step_index(step)))
    index = torch.arange(numel, dtype=torch.int64, device=seed.device)
    span = (stream & _M32) ^ mix32((_shr(stream, 32) + (index >> 32)) & _M32)
    bits = mix32(span ^ (index & _M32))
    return (bits >> 8).float() * (1.0 / 16777216.0)


def decayed_lr(lr: Tensor, step: Tensor, lr_decay: float) -> Tensor:
    """update.h's decayed_lr: in float64, rounded once to float32."""
    return (lr.reshape(()).double() / (1.0 + (step.reshape(()).double() - 1.0) * lr_decay)).float()


def _as_f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded float32 sqrt. torch's CPU float32 sqrt (MKL VML) is off by one ulp for
    about 15% of inputs; a float64 sqrt rounded to float32 is exact (53 >= 2 * 24 + 2 bits)."""
    return x.double().sqrt().float()


def _update(p: Tensor, raw: Tensor, s_old: Tensor, clr: Tensor, gnorm_scale: Optional[Tensor],
            weight_decay: float, eps: float, maximize: bool, skip_zeros: bool) -> tuple[Tensor, Tensor]:
    """New float32 (param, sum) of flat float32 tensors, as update.h computes them."""
    g = raw if gnorm_scale is None else raw * gnorm_scale.reshape(())
    if maximize:
        g = -g
    wd = _as_f32(weight_decay)
    if wd != 0.0:
        g = g + wd * p
    s = s_old + g * g
    p_new = p - (clr * g) / (_sqrt(s) + _as_f32(eps))
    if skip_zeros:
        keep = raw == 0
        p_new = torch.where(keep, p, p_new)
        s = torch.where(keep, s_old, s)
    return p_new, s


def step(params: Sequence[Tensor], grads: Sequence[Tensor], state_sums: Sequence[Tensor],
         steps: Sequence[Tensor], lr: Tensor, lr_decay: float, weight_decay: float, eps: float,
         maximize: bool, gnorm_scales: Optional[Sequence[Tensor]] = None, skip_zeros: bool = False) -> None:
    """adagrad8::step: one Adagrad step with float32 state, in place."""
    _checks.check_step(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, gnorm_scales)
    for i, p in enumerate(params):
        clr = decayed_lr(lr, steps[i], lr_decay)
        gs = None if gnorm_scales is None else gnorm_scales[i]
        p_new, s = _update(p.reshape(-1).float(), grads[i].reshape(-1).float(), state_sums[i].reshape(-1), clr,
                           gs, weight_decay, eps, maximize, skip_zeros)
        p.copy_(p_new.view(p.shape))
        state_sums[i].copy_(s.view(p.shape))


def step_quantized(params: Sequence[Tensor], grads: Sequence[Tensor], codes: Sequence[Tensor],
                   absmax: Sequence[Tensor], qmap: Tensor, steps: Sequence[Tensor], lr: Tensor,
                   lr_decay: float, weight_decay: float, eps: float, maximize: bool,
                   gnorm_scales: Optional[Sequence[Tensor]] = None, skip_zeros: bool = False,
                   block_size: int = 256, seeds: Optional[Sequence[Tensor]] = None) -> None:
    """adagrad8::step.quantized: one Adagrad step with 8-bit block-wise state, in place."""
    _checks.check_step_quantized(params, grads, codes, absmax, qmap, steps, lr, lr_decay, weight_decay, eps,
                                 gnorm_scales, block_size, seeds)
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        clr = decayed_lr(lr, steps[i], lr_decay)
        gs = None if gnorm_scales is None else gnorm_scales[i]
        s_old = Q.dequantize(codes[i], absmax[i], qmap, block_size).reshape(-1)
        p_new, s = _update(p.reshape(-1).float(), grads[i].reshape(-1).float(), s_old, clr, gs,
                           weight_decay, eps, maximize, skip_zeros)
        scales = Q.block_scales(s, block_size)
        x = Q.normalize(s, Q.per_element(scales, n, block_size))
        if seeds is None:
            new_codes = Q.nearest_codes(x, qmap)
        else:
            new_codes = Q.stochastic_codes(x, qmap, uniforms(seeds[i], steps[i], n))
        p.copy_(p_new.view(p.shape))
        codes[i].copy_(new_codes.view(p.shape))
        absmax[i].copy_(scales)
