"""Shared builders of adagrad8 op inputs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch

import torch_adagrad8  # noqa: F401  (registers the ops)
from torch_adagrad8 import qmap as Q

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("fp32", "blockwise", "tensorwise")  # state kinds: 32-bit, 8-bit per block, 8-bit per tensor
# The sizes and option sets every op-level test matrix covers.
SIZES = [(1,), (255,), (256,), (257,), (4096,), (100_003,), [(3, 5), (1,), (700,), (64, 65), (0,), (33,)]]
OPTIONS = [
    dict(weight_decay=0.1),
    dict(lr_decay=0.01),
    dict(maximize=True),
    dict(skip_zeros=True),
    dict(gnorm=True),
    dict(weight_decay=0.1, lr_decay=0.05, maximize=True, skip_zeros=True, gnorm=True),
]
ROUNDING = [dict(stochastic=True), dict(stochastic=True, signed=True, block_size=64)]  # 8-bit only


@dataclass
class Case:
    """Arguments of one op call; `overload` is torch.ops.adagrad8.step.default or .quantized."""

    kind: str
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def overload(self):
        return torch.ops.adagrad8.step.default if self.kind == "fp32" else torch.ops.adagrad8.step.quantized

    def clone(self) -> "Case":
        return Case(self.kind, copy.deepcopy(self.args), copy.deepcopy(self.kwargs))

    def run(self, impl=None) -> "Case":
        (impl or self.overload)(*self.args, **self.kwargs)
        return self

    def mutable(self) -> list[torch.Tensor]:
        """The tensors the op writes: params and state, flattened."""
        lists = (0, 2) if self.kind == "fp32" else (0, 2, 3)
        return [t for i in lists for t in self.args[i]]


def make_case(
    sizes=(257,),
    dtype=torch.float32,
    kind="fp32",
    *,
    lr=0.05,
    lr_decay=0.0,
    weight_decay=0.0,
    eps=1e-10,
    maximize=False,
    skip_zeros=False,
    gnorm=False,
    stochastic=False,
    block_size=256,
    signed=False,
    step=3.0,
    seed=0,
    device="cpu",
) -> Case:
    """Random but valid inputs: a few steps' worth of state, grads with some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(s,) if isinstance(s, int) else tuple(s) for s in sizes]

    def rand(shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device)

    params = [rand(s).to(dtype) for s in shapes]
    grads = []
    for s in shapes:
        g = rand(s)
        g[torch.rand(s, generator=gen).to(device) < 0.1] = 0.0  # exact zeros for skip_zeros
        grads.append(g.to(dtype))
    steps = [torch.tensor(step + i, device=device) for i in range(len(shapes))]
    common = dict(
        lr=torch.tensor(lr, device=device),
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
    )
    gnorm_scales = [torch.rand((), generator=gen).to(device) + 0.25 for _ in shapes] if gnorm else None
    sums = [rand(s).abs() * 3 for s in shapes]
    if kind == "fp32":
        args = (params, grads, sums, steps)
        kwargs = dict(common, gnorm_scales=gnorm_scales, skip_zeros=skip_zeros)
        return Case(kind, args, kwargs)
    bs = 0 if kind == "tensorwise" else block_size
    qmap = (Q.signed_map() if signed else Q.MAPS[Q.DEFAULT_MAP]()).to(device)
    codes, absmax = [], []
    for s in sums:
        c, a = Q.quantize(s, qmap, bs)
        codes.append(c)
        absmax.append(a)
    seeds = [torch.tensor(1234 + 7 * i, device=device) for i in range(len(shapes))] if stochastic else None
    args = (params, grads, codes, absmax, qmap, steps)
    kwargs = dict(common, gnorm_scales=gnorm_scales, skip_zeros=skip_zeros, block_size=bs, seeds=seeds)
    return Case(kind, args, kwargs)


def offset_copies(tensors, offset: int, device="cpu"):
    """Copies of tensors on device, each starting `offset` elements into a larger buffer (so its
    address is off any vector size that offset * element size is not a multiple of)."""
    return [torch.empty(t.numel() + offset, dtype=t.dtype, device=device)[offset:].view(t.shape).copy_(t)
            for t in tensors]


def with_lists_offset(args: tuple, lists, offset: int, device="cpu") -> tuple:
    """Op arguments args with the argument lists at indices `lists` replaced by offset_copies."""
    return tuple(offset_copies(x, offset, device) if i in lists else x for i, x in enumerate(args))


# Which argument lists (0: params, 1: grads, 2: sums or codes) a test places how many elements
# into their buffers: one list at a time off the kernels' 4-element vectors, all of them, and all
# 4 elements in (aligned again).
OFFSET_LAYOUTS = [pytest.param(lists, offset, id=name) for name, lists, offset in [
    ("params+1", (0,), 1), ("grads+2", (1,), 2), ("state+1", (2,), 1), ("state+2", (2,), 2),
    ("all+3", (0, 1, 2), 3), ("all+4", (0, 1, 2), 4)]]


def reference_impl(kind):
    from torch_adagrad8 import reference

    return reference.step if kind == "fp32" else reference.step_quantized


def assert_same(native: Case, ref: Case) -> None:
    """Every written tensor bit-identical (NaN payloads aside)."""
    for a, b in zip(native.mutable(), ref.mutable()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def exception_messages(exc):
    """str() of exc and of every exception it was raised from (torch.compile wraps our ValueErrors)."""
    while exc is not None:
        yield str(exc)
        exc = exc.__cause__ or exc.__context__
