"""Input checks of the adagrad8 ops (for the fake kernels, reference.py and functional.plan,
which checks every op call of a step before the first one runs), and of the options that the
optimizers and functional share.

The C++ kernels run the same op checks in the same order with the same messages
(csrc/validate.cpp); tests/test_bad_input.py holds the two together. Every failure is a
ValueError raised before anything is written. Symbolic conditions (while tracing) go through
torch._check_value. `at` maps an op call's list positions to the caller's, for messages.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from torch_adagrad8.qmap import MAP_SIZE, scale_count

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HISTORY = 100  # values in a percentile-clipping history (gnorm_vec); csrc/validate.h's kHistory
NO_HISTORY = -1.0  # gnorm_vec's first value while it holds no history; csrc/validate.h's kNoHistory


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check(cond, message: Callable[[], str]) -> None:
    """message is built only on failure (the checks run on every eager step). A concrete
    condition raises here; a symbolic one (a SymBool, while tracing) goes through
    torch._check_value."""
    if isinstance(cond, bool):
        if not cond:
            raise ValueError(message())
        return
    torch._check_value(cond, message)


def _lengths(name: str, n: int, expected: int) -> None:
    _check(n == expected, lambda: f"{name} has {n} tensors but params has {expected}")


def _device(name: str, t: Tensor, ref: Tensor, ref_name: str = "params[0]") -> None:
    _check(t.device == ref.device, lambda: f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _scalar(name: str, t: Tensor, dtype: torch.dtype) -> None:
    _sparse(name, t)
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


MAP_RULE = "map values must be finite, in [-1, 1] and sorted"


def map_values(values: Sequence[float], name: str = "qmap") -> None:
    """A map's values: finite, in [-1, 1] and sorted, which the encoders' searches assume."""
    for i, v in enumerate(values):
        _check(math.isfinite(v) and -1.0 <= v <= 1.0, lambda: f"{name}[{i}] is {v:g}; {MAP_RULE}")
    for i in range(len(values) - 1):
        a, b = values[i], values[i + 1]
        _check(a <= b, lambda: f"{name}[{i}] = {a:g} > {name}[{i + 1}] = {b:g}; {MAP_RULE}")


def check_map(qmap, name: str = "qmap") -> None:
    """A map that enters a state (an optimizer's qmap option, init_state, a loaded state): a
    floating-point tensor of MAP_SIZE values that map_values accepts. Its values are read once,
    here (on an accelerator that is one sync, when the state is made, never per step), and not
    while tracing."""
    if not isinstance(qmap, Tensor) or not qmap.is_floating_point() or qmap.numel() != MAP_SIZE:
        got = f"{_name(qmap.dtype)} with {qmap.numel()} values" if isinstance(qmap, Tensor) else type(qmap).__name__
        raise ValueError(f"{name} must be a floating-point tensor of {MAP_SIZE} values, got {got}")
    if torch.compiler.is_compiling() or qmap.is_meta or is_fake(qmap):  # no values to read (the op checks them)
        return
    map_values(qmap.detach().float().reshape(-1).tolist(), name)


def _op_map_values(qmap: Tensor) -> None:
    """The op's map-value check: only where the values are on the host (elsewhere reading them
    would sync) and real (a fake tensor has none: under torch.compile the kernel checks them)."""
    if not torch.compiler.is_compiling() and qmap.device.type == "cpu" and not is_fake(qmap):
        map_values(qmap.tolist())


class Overlaps:
    """Arguments that share memory: a tensor the op writes must not overlap any other argument
    (its result would depend on the order of reads and writes); read-only ones may share.
    csrc/validate.cpp's Overlaps, which runs the same sweep and so reports the same pair."""

    def __init__(self, at: Optional[Sequence[int]] = None):
        self._ix = _index(at)
        self._names: list[str] = []
        self._storages: dict[int, list[tuple[int, Tensor, bool]]] = {}

    def add(self, name: str, tensors, writes: bool, is_list: bool = True) -> None:
        if torch.compiler.is_dynamo_compiling():
            # Dynamo cannot trace storage identity; the fake kernel, which runs untraced on the
            # op call Dynamo records, checks it (the same message, positions in that call's lists).
            return
        for i, t in enumerate(tensors if is_list else [tensors]):
            order = len(self._names)
            self._names.append(f"{name}[{self._ix(i)}]" if is_list else name)
            self._storages.setdefault(t.untyped_storage()._cdata, []).append((order, t, writes))

    def check(self) -> None:
        found = None
        for members in self._storages.values():
            if len(members) < 2:  # the common case: no sizes are compared (they may be symbolic)
                continue
            spans = []
            for order, t, writes in members:
                size = t.element_size()
                if t.numel() != 0:
                    spans.append((t.storage_offset() * size, order, (t.storage_offset() + t.numel()) * size, writes))
            spans.sort(key=lambda s: (s[0], s[1]))
            any_end = written_end = None  # (end, order) of the furthest-ending span so far
            for begin, order, end, writes in spans:
                other = any_end if writes else written_end
                if other is not None and begin < other[0]:
                    pair = (max(order, other[1]), min(order, other[1]))
                    found = pair if found is None else min(found, pair)
                if any_end is None or end > any_end[0]:
                    any_end = (end, order)
                if writes and (written_end is None or end > written_end[0]):
                    written_end = (end, order)
        _check(found is None, lambda: f"{self._names[found[1]]} and {self._names[found[0]]} overlap in memory; "
               "a tensor the step writes must not share memory with another argument")


def _index(at: Optional[Sequence[int]]) -> Callable[[int], int]:
    return (lambda i: i) if at is None else (lambda i: at[i])


def _optional_scalars(name: str, tensors: Optional[Sequence[Tensor]], n: int, ref: Tensor, dtype: torch.dtype,
                      at: Optional[Sequence[int]] = None) -> None:
    if tensors is None:
        return
    ix = _index(at)
    _lengths(name, len(tensors), n)
    for i, t in enumerate(tensors):
        _device(f"{name}[{ix(i)}]", t, ref, f"params[{ix(0)}]")
        _scalar(f"{name}[{ix(i)}]", t, dtype)


def check_common(params, grads, state_name, state, steps, lr, lr_decay, weight_decay, eps, gnorm_scales,
                 at=None) -> None:
    n = len(params)
    ix = _index(at)
    _lengths("grads", len(grads), n)
    _lengths(state_name, len(state), n)
    _lengths("steps", len(steps), n)
    _scalar("lr", lr, torch.float32)
    _hyper("lr_decay", lr_decay)
    _hyper("weight_decay", weight_decay)
    _hyper("eps", eps)
    if n == 0:
        return
    p0, p0_name = params[0], f"params[{ix(0)}]"
    _device("lr", lr, p0, p0_name)
    for i, p in enumerate(params):
        pname = f"params[{ix(i)}]"
        _device(pname, p, p0, p0_name)
        _sparse(pname, p)
        _check(
            p.dtype in _PARAM_DTYPES,
            lambda: f"{pname} has dtype {_name(p.dtype)} but must be float32, float16 or bfloat16",
        )
        _check(p.dtype == p0.dtype, lambda: f"{pname} has dtype {_name(p.dtype)} but {p0_name} has dtype {_name(p0.dtype)}")
        _check(p.is_contiguous(), lambda: f"{pname} must be contiguous")
        _device(f"grads[{ix(i)}]", grads[i], p0, p0_name)
        _like_param(f"grads[{ix(i)}]", grads[i], p, ix(i), p.dtype)
        _device(f"{state_name}[{ix(i)}]", state[i], p0, p0_name)
        _device(f"steps[{ix(i)}]", steps[i], p0, p0_name)
        _scalar(f"steps[{ix(i)}]", steps[i], torch.float32)
    _optional_scalars("gnorm_scales", gnorm_scales, n, p0, torch.float32, at)


def check_step(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, gnorm_scales=None, at=None) -> None:
    check_common(params, grads, "state_sums", state_sums, steps, lr, lr_decay, weight_decay, eps, gnorm_scales, at)
    ix = _index(at)
    for i, p in enumerate(params):
        _like_param(f"state_sums[{ix(i)}]", state_sums[i], p, ix(i), torch.float32)
    overlaps = Overlaps(at)  # in argument order
    overlaps.add("params", params, True)
    overlaps.add("grads", grads, False)
    overlaps.add("state_sums", state_sums, True)
    overlaps.add("steps", steps, False)
    overlaps.add("lr", lr, False, is_list=False)
    overlaps.add("gnorm_scales", gnorm_scales or [], False)
    overlaps.check()


def check_step_quantized(
    params, grads, codes, absmax, qmap, steps, lr, lr_decay, weight_decay, eps, gnorm_scales, block_size, seeds,
    at=None,
) -> None:
    check_common(params, grads, "codes", codes, steps, lr, lr_decay, weight_decay, eps, gnorm_scales, at)
    n = len(params)
    ix = _index(at)
    _lengths("absmax", len(absmax), n)
    _check(block_size >= 0, lambda: f"block_size must be >= 1, or 0 for one block per tensor, got {block_size}")
    _check(
        qmap.dtype == torch.float32 and qmap.numel() == MAP_SIZE and qmap.is_contiguous(),
        lambda: f"qmap must be a contiguous float32 tensor of {MAP_SIZE} elements, got {_name(qmap.dtype)} "
        f"with {qmap.numel()} elements",
    )
    if n == 0:
        return
    _device("qmap", qmap, params[0], f"params[{ix(0)}]")
    for i, p in enumerate(params):
        _like_param(f"codes[{ix(i)}]", codes[i], p, ix(i), torch.uint8)
        aname = f"absmax[{ix(i)}]"
        _device(aname, absmax[i], params[0], f"params[{ix(0)}]")
        need = scale_count(p.numel(), block_size)
        _check(
            absmax[i].dtype == torch.float32 and absmax[i].is_contiguous(),
            lambda: f"{aname} must be a contiguous float32 tensor",
        )
        _check(
            absmax[i].numel() == need,
            lambda: f"{aname} has {absmax[i].numel()} elements but params[{ix(i)}] needs {need} for block_size {block_size}",
        )
    _optional_scalars("seeds", seeds, n, params[0], torch.int64, at)
    _op_map_values(qmap)
    overlaps = Overlaps(at)  # in argument order
    overlaps.add("params", params, True)
    overlaps.add("grads", grads, False)
    overlaps.add("codes", codes, True)
    overlaps.add("absmax", absmax, True)
    overlaps.add("qmap", qmap, False, is_list=False)
    overlaps.add("steps", steps, False)
    overlaps.add("lr", lr, False, is_list=False)
    overlaps.add("gnorm_scales", gnorm_scales or [], False)
    overlaps.add("seeds", seeds or [], False)
    overlaps.check()


def check_percentile_clip(grads, gnorm_vecs, steps, percentile, at=None) -> None:
    n = len(grads)
    ix = _index(at)
    _check(len(gnorm_vecs) == n, lambda: f"gnorm_vecs has {len(gnorm_vecs)} tensors but grads has {n}")
    _check(len(steps) == n, lambda: f"steps has {len(steps)} tensors but grads has {n}")
    _check(1 <= percentile <= 99, lambda: f"percentile must be in [1, 99], got {percentile}")
    for i, g in enumerate(grads):
        gname, vname, v = f"grads[{ix(i)}]", f"gnorm_vecs[{ix(i)}]", gnorm_vecs[i]
        _device(gname, g, grads[0], f"grads[{ix(0)}]")
        _sparse(gname, g)
        _check(g.dtype in _PARAM_DTYPES, lambda: f"{gname} has dtype {_name(g.dtype)} but must be float32, float16 or bfloat16")
        _device(vname, v, g, gname)
        _check(
            v.dtype == torch.float32 and v.dim() == 1 and v.numel() == HISTORY and v.is_contiguous(),
            lambda: f"{vname} must be a contiguous float32 tensor of shape [{HISTORY}], got {_name(v.dtype)} of shape "
            f"{_shape(v)}",
        )
        _device(f"steps[{ix(i)}]", steps[i], g, gname)
        _scalar(f"steps[{ix(i)}]", steps[i], torch.float32)
    overlaps = Overlaps(at)  # in argument order
    overlaps.add("grads", grads, False)
    overlaps.add("gnorm_vecs", gnorm_vecs, True)
    overlaps.add("steps", steps, False)
    overlaps.check()


def check_block_record(label: str, value) -> None:
    """The block size an 8-bit state records (`block_size`): an int, not a tensor (reading one
    would sync) or a float."""
    if not is_int(value, 0):
        raise ValueError(f"{label} must be an int >= 0 (0: one scale per tensor), got {value!r}")


def check_counts(counts) -> None:
    """`adagrad8::increment`'s arguments: float32 tensors of one element, all on counts[0]'s device."""
    for i, t in enumerate(counts):
        _device(f"counts[{i}]", t, counts[0], "counts[0]")
        _scalar(f"counts[{i}]", t, torch.float32)


def check_overlaps(written, read, names) -> None:
    """The overlap rule alone (`adagrad8::validate.overlaps`): no tensor in written may share
    memory with another; names (written, then read, or empty) name them in the message."""
    n = len(written) + len(read)
    _check(not names or len(names) == n, lambda: f"names has {len(names)} entries but there are {n} tensors; "
           "give one name per tensor (written, then read) or none")
    tensors = list(written) + list(read)
    for i, t in enumerate(tensors):
        _sparse(names[i] if names else f"written[{i}]" if i < len(written) else f"read[{i - len(written)}]", t)
    overlaps = Overlaps()  # written, then read
    if not names:
        overlaps.add("written", written, True)
        overlaps.add("read", read, False)
    else:
        for i, t in enumerate(tensors):
            overlaps.add(names[i], t, i < len(written), is_list=False)
    overlaps.check()


# ---- options shared by the optimizers and functional ----------------------------------------

def is_number(v) -> bool:
    """A finite real number >= 0 (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


OPTIONS = {  # option: (is it valid, what it must be)
    "lr_decay": (is_number, "a finite number >= 0"),
    "weight_decay": (is_number, "a finite number >= 0"),
    "eps": (is_number, "a finite number >= 0"),
    "initial_accumulator_value": (is_number, "a finite number >= 0"),
    "optim_bits": (lambda v: is_int(v, 8) and v in (8, 32), "8 or 32"),
    "percentile_clipping": (lambda v: is_int(v, 1) and v <= 100, "an int in [1, 100]; 100 = off"),
    "min_8bit_size": (lambda v: is_int(v, 0), "an int >= 0"),
    "block_size": (lambda v: is_int(v, 1), "an int >= 1"),
    "block_wise": (lambda v: isinstance(v, bool), "True or False"),
    "maximize": (lambda v: isinstance(v, bool), "True or False"),
    "skip_zeros": (lambda v: isinstance(v, bool), "True or False"),
    "stochastic_rounding": (lambda v: isinstance(v, bool), "True or False"),
}


def check_option(key: str, value) -> None:
    valid, requirement = OPTIONS[key]
    if not valid(value):
        raise ValueError(f"Invalid {key}: {value!r} (must be {requirement})")


def check_lr(lr) -> None:
    """A number, or a tensor holding one floating-point value (whose value is the caller's:
    reading it would sync)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"Invalid lr: a tensor lr must be one floating-point value, got {lr!r}")
    elif not is_number(lr):
        raise ValueError(f"Invalid lr: {lr!r} (must be a finite number >= 0, or a tensor)")
