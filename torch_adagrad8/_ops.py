"""The adagrad8 custom ops: loads the compiled library, registers the fake kernels, and
offers typed wrappers.

Schemas live in csrc/ops.cpp. The fake kernels validate, raising exactly what the C++ kernels raise, and
make the outputs (only percentile_clip has any: the step ops mutate their inputs in place).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from torch_adagrad8 import _checks, reference

_LIBRARY = next(Path(__file__).parent.glob("*adagrad8*.so"), None)
if _LIBRARY is None:
    raise ImportError(
        f"torch_adagrad8's compiled library is missing from {Path(__file__).parent}. Install the package "
        "with `pip install --no-build-isolation .`; if that is the source tree, run from another directory."
    )
torch.ops.load_library(str(_LIBRARY))

from torch_adagrad8 import _build_info  # noqa: E402  (written by CMake next to the library)

STEP = "adagrad8::step"
STEP_QUANTIZED = "adagrad8::step.quantized"
PERCENTILE_CLIP = "adagrad8::percentile_clip"
VALIDATE = "adagrad8::validate"
VALIDATE_QUANTIZED = "adagrad8::validate.quantized"
VALIDATE_OVERLAPS = "adagrad8::validate.overlaps"
INCREMENT = "adagrad8::increment"


@torch.library.register_fake(VALIDATE)
@torch.library.register_fake(STEP)
def _step_fake(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, maximize,
               gnorm_scales=None, skip_zeros=False):
    _checks.check_step(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, gnorm_scales)


@torch.library.register_fake(VALIDATE_QUANTIZED)
@torch.library.register_fake(STEP_QUANTIZED)
def _step_quantized_fake(params, grads, codes, absmax, qmap, steps, lr, lr_decay, weight_decay, eps, maximize,
                         gnorm_scales=None, skip_zeros=False, block_size=256, seeds=None):
    _checks.check_step_quantized(params, grads, codes, absmax, qmap, steps, lr, lr_decay, weight_decay, eps,
                                 gnorm_scales, block_size, seeds)


@torch.library.register_fake(VALIDATE_OVERLAPS)
def _overlaps_fake(written, read, names):
    _checks.check_overlaps(written, read, names)


@torch.library.register_fake(INCREMENT)
def _increment_fake(counts):
    _checks.check_counts(counts)


@torch.library.register_fake(PERCENTILE_CLIP)
def _percentile_clip_fake(grads, gnorm_vecs, steps, percentile):
    _checks.check_percentile_clip(grads, gnorm_vecs, steps, percentile)
    return grads[0].new_empty((len(grads),), dtype=torch.float32) if grads else torch.empty(0, dtype=torch.float32)


# Devices without a native kernel run reference.py (CUDA too, when built without it).
_DEVICE_KEYS = {"cuda": "CUDA", "xpu": "XPU", "mps": "MPS"}
REFERENCE_DEVICES = tuple(
    device for device, key in _DEVICE_KEYS.items()
    if not (device == "cuda" and _build_info.WITH_CUDA)
)
for _op, _impl in ((STEP, reference.step), (STEP_QUANTIZED, reference.step_quantized)):
    torch.library.register_kernel(_op, REFERENCE_DEVICES, _impl)


def step(params: Sequence[Tensor], grads: Sequence[Tensor], state_sums: Sequence[Tensor],
         steps: Sequence[Tensor], lr: Tensor, lr_decay: float = 0.0, weight_decay: float = 0.0,
         eps: float = 1e-10, maximize: bool = False, gnorm_scales: Optional[Sequence[Tensor]] = None,
         skip_zeros: bool = False) -> None:
    """One Adagrad step with float32 state (`adagrad8::step`), in place on params and state_sums.

    steps are the per-tensor step counts, already incremented (1 on the first step).
    """
    torch.ops.adagrad8.step.default(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, maximize,
                                    gnorm_scales, skip_zeros)


def step_quantized(params: Sequence[Tensor], grads: Sequence[Tensor], codes: Sequence[Tensor],
                   absmax: Sequence[Tensor], qmap: Tensor, steps: Sequence[Tensor], lr: Tensor,
                   lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False,
                   gnorm_scales: Optional[Sequence[Tensor]] = None, skip_zeros: bool = False,
                   block_size: int = 256, seeds: Optional[Sequence[Tensor]] = None) -> None:
    """One Adagrad step with 8-bit state (`adagrad8::step.quantized`), in place on params, codes, absmax.

    block_size 0 keeps one scale per tensor. seeds (one int64 per tensor) turns on stochastic rounding.
    """
    torch.ops.adagrad8.step.quantized(params, grads, codes, absmax, qmap, steps, lr, lr_decay, weight_decay, eps,
                                      maximize, gnorm_scales, skip_zeros, block_size, seeds)


def increment(counts: Sequence[Tensor]) -> None:
    """Adds 1 to each count (float32, one element, one device) in place (`adagrad8::increment`)."""
    torch.ops.adagrad8.increment.default(counts)


def percentile_clip(grads: Sequence[Tensor], gnorm_vecs: Sequence[Tensor], steps: Sequence[Tensor],
                    percentile: int) -> tuple[Tensor, ...]:
    """Percentile clipping (`adagrad8::percentile_clip`): records each gradient's squared norm in its
    gnorm_vec and returns the gnorm_scales for step / step_quantized (0-dim views of the op's output).
    steps are already incremented.

    A gnorm_vec whose first value is -1 (NO_HISTORY) holds no history yet: it is filled with this norm.
    """
    return torch.ops.adagrad8.percentile_clip.default(grads, gnorm_vecs, steps, percentile).unbind()
