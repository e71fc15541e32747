"""Input checks of the adagrad8 ops, for the fake kernel and reference.py.

The C++ kernels run the same checks in the same order with the same messages
(csrc/validate.cpp); tests/test_bad_input.py holds the two together. Every failure is a
ValueError raised before anything is written. Conditions go through torch._check_value so
that they also work on symbolic sizes while tracing.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from torch_adagrad8.qmap import MAP_SIZE, scale_count

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check(cond, message: Callable[[], str]) -> None:
    """message is built only on failure: the checks run on every eager step."""
    if cond is True:  # concrete and true; a symbolic condition (tracing) is a SymBool
        return
    torch._check_value(cond, message)


def _lengths(name: str, n: int, expected: int) -> None:
    _check(n == expected, lambda: f"{name} has {n} tensors but params has {expected}")


def _device(name: str, t: Tensor, ref: Tensor) -> None:
    _check(t.device == ref.device, lambda: f"{name} is on {t.device} but params[0] is on {ref.device}")


def _scalar(name: str, t: Tensor, dtype: torch.dtype) -> None:
    _check(
        t.dtype == dtype and t.numel() == 1,
        lambda: f"{name} must hold one {_name(dtype)} value, got {_name(t.dtype)} with {t.numel()} elements",
    )


def _hyper(name: str, v: float) -> None:
    _check(math.isfinite(v) and v >= 0.0, lambda: f"{name} must be finite and >= 0, got {v:g}")


def _sparse(name: str, t: Tensor) -> None:
    _check(t.layout == torch.strided, lambda: f"{name} is sparse; only dense tensors are supported")


def _like_param(name: str, t: Tensor, p: Tensor, i: int, dtype: torch.dtype) -> None:
    _sparse(name, t)
    _check(t.dtype == dtype, lambda: f"{name} has dtype {_name(t.dtype)} but must be {_name(dtype)}")
    _check(t.shape == p.shape, lambda: f"{name} has shape {_shape(t)} but params[{i}] has shape {_shape(p)}")
    _check(t.is_contiguous(), lambda: f"{name} must be contiguous")


def _optional_scalars(name: str, tensors: Optional[Sequence[Tensor]], n: int, ref: Tensor, dtype: torch.dtype) -> None:
    if tensors is None:
        return
    _lengths(name, len(tensors), n)
    for i, t in enumerate(tensors):
        _device(f"{name}[{i}]", t, ref)
        _scalar(f"{name}[{i}]", t, dtype)


def check_common(params, grads, state_name, state, steps, lr, lr_decay, weight_decay, eps, gnorm_scales) -> None:
    n = len(params)
    _lengths("grads", len(grads), n)
    _lengths(state_name, len(state), n)
    _lengths("steps", len(steps), n)
    _scalar("lr", lr, torch.float32)
    _hyper("lr_decay", lr_decay)
    _hyper("weight_decay", weight_decay)
    _hyper("eps", eps)
    if n == 0:
        return
    p0 = params[0]
    _device("lr", lr, p0)
    for i, p in enumerate(params):
        pname = f"params[{i}]"
        _device(pname, p, p0)
        _sparse(pname, p)
        _check(
            p.dtype in _PARAM_DTYPES,
            lambda: f"{pname} has dtype {_name(p.dtype)} but must be float32, float16 or bfloat16",
        )
        _check(p.dtype == p0.dtype, lambda: f"{pname} has dtype {_name(p.dtype)} but params[0] has dtype {_name(p0.dtype)}")
        _check(p.is_contiguous(), lambda: f"{pname} must be contiguous")
        _device(f"grads[{i}]", grads[i], p0)
        _like_param(f"grads[{i}]", grads[i], p, i, p.dtype)
        _device(f"{state_name}[{i}]", state[i], p0)
        _device(f"steps[{i}]", steps[i], p0)
        _scalar(f"steps[{i}]", steps[i], torch.float32)
    _optional_scalars("gnorm_scales", gnorm_scales, n, p0, torch.float32)


def check_step(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, gnorm_scales=None) -> None:
    check_common(params, grads, "state_sums", state_sums, steps, lr, lr_decay, weight_decay, eps, gnorm_scales)
    for i, p in enumerate(params):
        _like_param(f"state_sums[{i}]", state_sums[i], p, i, torch.float32)


def check_step_quantized(
    params, grads, codes, absmax, qmap, steps, lr, lr_decay, weight_decay, eps, gnorm_scales, block_size, seeds
) -> None:
    check_common(params, grads, "codes", codes, steps, lr, lr_decay, weight_decay, eps, gnorm_scales)
    n = len(params)
    _lengths("absmax", len(absmax), n)
    _check(block_size >= 0, lambda: f"block_size must be >= 1, or 0 for one block per tensor, got {block_size}")
    _check(
        qmap.dtype == torch.float32 and qmap.numel() == MAP_SIZE and qmap.is_contiguous(),
        lambda: f"qmap must be a contiguous float32 tensor of {MAP_SIZE} elements, got {_name(qmap.dtype)} "
        f"with {qmap.numel()} elements",
    )
    if n == 0:
        return
    _device("qmap", qmap, params[0])
    for i, p in enumerate(params):
        _like_param(f"codes[{i}]", codes[i], p, i, torch.uint8)
        aname = f"absmax[{i}]"
        _device(aname, absmax[i], params[0])
        need = scale_count(p.numel(), block_size)
        _check(
            absmax[i].dtype == torch.float32 and absmax[i].is_contiguous(),
            lambda: f"{aname} must be a contiguous float32 tensor",
        )
        _check(
            absmax[i].numel() == need,
            lambda: f"{aname} has {absmax[i].numel()} elements but params[{i}] needs {need} for block_size {block_size}",
        )
    _optional_scalars("seeds", seeds, n, params[0], torch.int64)


def check_percentile_clip(grads, gnorm_vecs, steps, percentile) -> None:
    n = len(grads)
    _check(len(gnorm_vecs) == n, lambda: f"gnorm_vecs has {len(gnorm_vecs)} tensors but grads has {n}")
    _check(len(steps) == n, lambda: f"steps has {len(steps)} tensors but grads has {n}")
    _check(1 <= percentile <= 99, lambda: f"percentile must be in [1, 99], got {percentile}")
    for i, g in enumerate(grads):
        gname, vname, v = f"grads[{i}]", f"gnorm_vecs[{i}]", gnorm_vecs[i]
        _check(g.device == grads[0].device, lambda: f"{gname} is on {g.device} but grads[0] is on {grads[0].device}")
        _sparse(gname, g)
        _check(g.dtype in _PARAM_DTYPES, lambda: f"{gname} has dtype {_name(g.dtype)} but must be float32, float16 or bfloat16")
        _check(v.device == g.device, lambda: f"{vname} is on {v.device} but {gname} is on {g.device}")
        _check(
            v.dtype == torch.float32 and v.dim() == 1 and v.numel() == 100 and v.is_contiguous(),
            lambda: f"{vname} must be a contiguous float32 tensor of shape [100], got {_name(v.dtype)} of shape {_shape(v)}",
        )
        _check(steps[i].device == g.device, lambda: f"steps[{i}] is on {steps[i].device} but {gname} is on {g.device}")
        _scalar(f"steps[{i}]", steps[i], torch.float32)
