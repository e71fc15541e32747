"""Adagrad over explicit tensors: what the optimizer classes run, for code that keeps params, grads
and state itself (a custom loop, a module that torch.export exports with its step inside).

A state is a dict of tensors on its parameter's device, in the optimizer's layout (optimizer.py):
``step``; ``sum`` (32-bit) or ``state1`` / ``absmax1`` / ``qmap1`` (8-bit); ``gnorm_vec`` for
percentile clipping; ``seed`` for stochastic rounding. ``init_state`` makes one. The caller passes
the 8-bit block size with every step; a state may also hold ``block_size``, the int it was made
with (the optimizers record it), and a step that asks for other blocks then raises.

    states = [F.init_state(p, optim_bits=8) for p in params]
    F.adagrad(params, grads, states, lr=0.01)

Parameters must be real (float32, float16, bfloat16) and contiguous. Nothing here reads a value
on the host, and a failing call raises before it writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from torch_adagrad8 import _checks, _ops, qmap as Q

NO_HISTORY = _checks.NO_HISTORY  # gnorm_vec's first value while empty: the next step fills every slot


def new_history(device: torch.device) -> Tensor:
    """An empty percentile-clipping history (gnorm_vec)."""
    return torch.full((_checks.HISTORY,), NO_HISTORY, dtype=torch.float32, device=device)


_DEFAULT_MAPS: dict[torch.device, Tensor] = {}


def default_map(device: torch.device) -> Tensor:
    """The default map (qmap.DEFAULT_MAP) on device: one tensor per device, so that states made with the default
    map share op calls (calls are grouped by map identity)."""
    device = torch.device(device)
    if device not in _DEFAULT_MAPS:
        _DEFAULT_MAPS[device] = Q.MAPS[Q.DEFAULT_MAP]().to(device)
    return _DEFAULT_MAPS[device]


def _check_block_size(block_size) -> None:
    if not _checks.is_int(block_size, 0):
        raise ValueError(f"Invalid block_size: {block_size!r} (must be an int >= 1, or 0 for one scale per tensor)")


def init_state(param: Tensor, *, optim_bits: int = 32, initial_accumulator_value: float = 0.0,
               block_size: int = 256, qmap: Optional[Tensor] = None, percentile_clipping: int = 100,
               seed: Optional[int] = None) -> dict[str, Tensor]:
    """A fresh state for param. 8-bit: block_size elements per scale (0: one scale per tensor) and
    qmap (default: the default map (qmap.DEFAULT_MAP) on param's device; states that share one map tensor share op
    calls). seed: the stochastic-rounding seed, if it will be on."""
    _checks.check_option("optim_bits", optim_bits)
    _checks.check_option("initial_accumulator_value", initial_accumulator_value)
    _checks.check_option("percentile_clipping", percentile_clipping)
    _check_block_size(block_size)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"Invalid seed: {seed!r} (must be an int or None)")
    if qmap is not None:  # shared by identity with other states: used as it is, not converted
        _checks.check_map(qmap)
        if qmap.dtype != torch.float32 or not qmap.is_contiguous() or qmap.device != param.device:
            raise ValueError(f"qmap must be a contiguous float32 tensor on the parameter's device ({param.device}), "
                             f"got {str(qmap.dtype).removeprefix('torch.')} on {qmap.device}")
    return build_state(param, optim_bits, float(initial_accumulator_value), block_size, qmap, percentile_clipping, seed)


def build_state(param: Tensor, optim_bits: int, init: float, block_size: int, qmap: Optional[Tensor],
                percentile_clipping: int, seed: Optional[int]) -> dict[str, Tensor]:
    """init_state without its checks, for callers whose options and map are checked already (the
    optimizers: reading a map's values inside a step would sync, and break a compiled graph)."""
    device = param.device
    state = {"step": torch.zeros((), dtype=torch.float32, device=device)}
    if optim_bits == 8:
        qmap = default_map(device) if qmap is None else qmap
        # Every element starts at init: every block has scale init and the code of init / init.
        code, scale = Q.quantize(torch.full((1,), init, device=device), qmap, 0)
        state["state1"] = code.reshape(()).expand(param.shape).contiguous()
        state["absmax1"] = scale.expand(Q.scale_count(param.numel(), block_size)).contiguous()
        state["qmap1"] = qmap
    else:
        state["sum"] = torch.full(param.shape, init, dtype=torch.float32, device=device)
    if percentile_clipping < 100:
        state["gnorm_vec"] = new_history(device)
    if seed is not None:
        state["seed"] = torch.tensor(seed, dtype=torch.int64, device=device)
    return state


# The tensors of a step, by OpCall.tensors key: how messages name them (by position in the
# step's params and states) and whether the step writes them (the ops write params and state;
# OpCall.run increments steps and records clipping histories).
_TENSORS = {
    "params": ("params[{}]", True), "state_sums": ("states[{}]['sum']", True),
    "codes": ("states[{}]['state1']", True), "absmax": ("states[{}]['absmax1']", True),
    "steps": ("states[{}]['step']", True), "gnorm_vecs": ("states[{}]['gnorm_vec']", True),
    "grads": ("grads[{}]", False), "qmap": ("states[{}]['qmap1']", False), "seeds": ("states[{}]['seed']", False),
    "lr": ("lr", False),
}


@dataclass
class OpCall:
    """One checked op call of a step: params that share device, dtype, state kind and map."""
    op: Callable[..., None]
    args: tuple
    kwargs: dict[str, Any]
    grads: list[Tensor]
    steps: list[Tensor]
    gnorm_vecs: Optional[list[Tensor]]
    percentile: int
    members: list[int]  # positions in the step's params and states
    tensors: dict[str, list[Tensor]]  # every tensor argument, by _TENSORS key (qmap and lr: one)

    def run(self) -> None:
        if torch.compiler.is_compiling():
            torch._foreach_add_(self.steps, 1)  # Inductor makes it one kernel
        else:
            _ops.increment(self.steps)  # on the CPU 0.12 us a tensor, _foreach_add_ 1.2
        scales = None
        if self.gnorm_vecs is not None:
            scales = _ops.percentile_clip(self.grads, self.gnorm_vecs, self.steps, self.percentile)
        self.op(*self.args, gnorm_scales=scales, **self.kwargs)


def lr_tensor(lr: float | Tensor, device: torch.device, cache: Optional[dict] = None) -> Tensor:
    """lr as the float32 tensor on device that the ops read. A float is added to zeros, not
    filled: torch.compile specializes a float given to fill_ (one recompile per new lr), while an
    added one stays a graph input. 0 + lr rounds like fill_. cache (eager callers that step
    repeatedly, e.g. the optimizers) keeps the last float's tensor per CPU device: making it costs two
    tensor ops a step, which a step of small parameters feels (the ops only read it). Not on other
    devices: a tensor kept from one stream and dropped while another still reads it would race."""
    if isinstance(lr, Tensor):
        return lr.to(device=device, dtype=torch.float32)
    if device.type != "cpu":
        cache = None
    if cache is not None:
        held = cache.get(device)
        if held is not None and held[0] == lr:
            return held[1]
    t = torch.zeros((), dtype=torch.float32, device=device).add_(lr)
    if cache is not None:
        cache[device] = (lr, t)
    return t


def plan(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], *, lr: float | Tensor,
         lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False,
         percentile_clipping: int = 100, skip_zeros: bool = False, block_size: int = 256,
         stochastic_rounding: bool = False) -> list[OpCall]:
    """The checked op calls of one step, one per (device, dtype, state kind, map); writes nothing.
    Messages name tensors by their positions in params, grads and states."""
    calls = op_calls(params, grads, states, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                     maximize=maximize, percentile_clipping=percentile_clipping, skip_zeros=skip_zeros,
                     block_size=block_size, stochastic_rounding=stochastic_rounding)
    check_overlaps(calls)
    return calls


def op_calls(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], *, lr: float | Tensor,
             lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False,
             percentile_clipping: int = 100, skip_zeros: bool = False, block_size: int = 256,
             stochastic_rounding: bool = False, lr_cache: Optional[dict] = None) -> list[OpCall]:
    """plan without the overlap check across calls (each call is checked on its own): for a
    caller that steps several plans and checks them together (check_overlaps). lr_cache: see
    lr_tensor."""
    if not torch.compiler.is_compiling():  # a float lr is a graph input there: no value to check
        _checks.check_lr(lr)
    for key, value in (("lr_decay", lr_decay), ("weight_decay", weight_decay), ("eps", eps), ("maximize", maximize),
                       ("percentile_clipping", percentile_clipping), ("skip_zeros", skip_zeros),
                       ("stochastic_rounding", stochastic_rounding)):
        _checks.check_option(key, value)
    _check_block_size(block_size)
    if not len(params) == len(grads) == len(states):
        raise ValueError(f"params, grads and states have {len(params)}, {len(grads)} and {len(states)} entries; "
                         "they must match")
    needs = {False: ["gnorm_vec"] if percentile_clipping < 100 else [],  # state keys by state kind
             True: (["gnorm_vec"] if percentile_clipping < 100 else []) + (["seed"] if stochastic_rounding else [])}
    # (device, dtype, 8-bit) -> [(map, members)]. Maps are told apart by identity (`is`): id() and
    # data_ptr() do not survive torch.compile. `calls` keeps the members in order of first appearance.
    groups: dict[tuple, list[tuple[Optional[Tensor], list[int]]]] = {}
    calls: list[list[int]] = []
    for i, (p, state) in enumerate(zip(params, states)):
        eight_bit = "state1" in state
        if not eight_bit and "sum" not in state:
            raise ValueError(f"states[{i}] has neither 'sum' (32-bit) nor 'state1' (8-bit); make it with init_state")
        for key in needs[eight_bit]:
            if key not in state:
                raise ValueError(f"states[{i}] has no '{key}', which percentile_clipping={percentile_clipping}, "
                                 f"stochastic_rounding={stochastic_rounding} need; make it with init_state")
        made = state.get("block_size", block_size) if eight_bit else block_size
        if type(made) is not int or made != block_size:  # (a tensor's != would sync)
            _checks.check_block_record(f"states[{i}]['block_size']", made)
            if not Q.same_blocks(p.numel(), made, block_size):
                raise ValueError(f"states[{i}] holds 8-bit state made with block_size={made}, but this step asks for "
                                 f"block_size={block_size} (0: one scale per tensor); the blocks differ")
        qmap = state.get("qmap1")
        entries = groups.setdefault((p.device, p.dtype, eight_bit), [])
        for q, members in entries:
            if q is qmap:
                members.append(i)
                break
        else:
            entries.append((qmap, [i]))
            calls.append(entries[-1][1])
    return [_op_call(params, grads, states, members, lr, lr_decay, weight_decay, eps, maximize, percentile_clipping,
                     skip_zeros, block_size, stochastic_rounding, lr_cache) for members in calls]


def check_overlaps(calls: Sequence[OpCall], offsets: Optional[Sequence[int]] = None) -> None:
    """The overlap rule over a whole step: no tensor a call writes, or that OpCall.run writes
    (step counts, clipping histories), may share memory with any tensor of any call. Each call's
    own check compares only its own arguments, and takes those two as read-only. Messages name
    tensors by position (call i's members shifted by offsets[i]). Eagerly one unnamed C++ check;
    names are built only to report a failure. While tracing, the fake kernel checks (Dynamo
    cannot trace storage identity), so it gets the names."""
    written: list[Tensor] = []
    read: list[Tensor] = []
    for call in calls:
        for key, tensors in call.tensors.items():
            (written if _TENSORS[key][1] else read).extend(tensors)
    if not torch.compiler.is_compiling():
        try:
            torch.ops.adagrad8.validate.overlaps(written, read, [])
            return
        except ValueError:
            pass
    names: dict[bool, list[str]] = {True: [], False: []}
    for c, call in enumerate(calls):
        shift = offsets[c] if offsets is not None else 0
        for key, tensors in call.tensors.items():
            form, writes = _TENSORS[key]
            names[writes].extend(form.format(call.members[j] + shift) for j in range(len(tensors)))
    torch.ops.adagrad8.validate.overlaps(written, read, names[True] + names[False])


def _op_call(params, grads, states, members, lr, lr_decay, weight_decay, eps, maximize, percentile_clipping,
             skip_zeros, block_size, stochastic_rounding, lr_cache) -> OpCall:
    ps = [params[i] for i in members]
    gs = [grads[i] for i in members]
    sts = [states[i] for i in members]
    steps = [s["step"] for s in sts]
    hyper = dict(lr=lr_tensor(lr, ps[0].device, lr_cache), lr_decay=float(lr_decay), weight_decay=float(weight_decay),
                 eps=float(eps), maximize=maximize, skip_zeros=skip_zeros)
    gnorm_vecs = None
    if percentile_clipping < 100:
        gnorm_vecs = [s["gnorm_vec"] for s in sts]
        _checks.check_percentile_clip(gs, gnorm_vecs, steps, percentile_clipping, at=members)
    if "state1" in sts[0]:
        codes, absmax, qmap = [s["state1"] for s in sts], [s["absmax1"] for s in sts], sts[0]["qmap1"]
        seeds = [s["seed"] for s in sts] if stochastic_rounding else None
        _validate(torch.ops.adagrad8.validate.quantized, _checks.check_step_quantized, members,
                  (ps, gs, codes, absmax, qmap, steps, hyper["lr"], hyper["lr_decay"], hyper["weight_decay"],
                   hyper["eps"]), dict(gnorm_scales=None, block_size=block_size, seeds=seeds))
        tensors = dict(params=ps, codes=codes, absmax=absmax, steps=steps, gnorm_vecs=gnorm_vecs or [], grads=gs,
                       qmap=[qmap], seeds=seeds or [], lr=[hyper["lr"]])
        return OpCall(_ops.step_quantized, (ps, gs, codes, absmax, qmap, steps),
                      dict(hyper, block_size=block_size, seeds=seeds), gs, steps, gnorm_vecs, percentile_clipping,
                      members, tensors)
    sums = [s["sum"] for s in sts]
    _validate(torch.ops.adagrad8.validate.default, _checks.check_step, members,
              (ps, gs, sums, steps, hyper["lr"], hyper["lr_decay"], hyper["weight_decay"], hyper["eps"]),
              dict(gnorm_scales=None))
    tensors = dict(params=ps, state_sums=sums, steps=steps, gnorm_vecs=gnorm_vecs or [], grads=gs, lr=[hyper["lr"]])
    return OpCall(_ops.step, (ps, gs, sums, steps), hyper, gs, steps, gnorm_vecs, percentile_clipping, members,
                  tensors)


def _validate(op, python_check, members: list[int], args: tuple, kwargs: dict) -> None:
    """Checks one op call before anything is written. Eagerly the op's own C++ checks run, in one
    call for the whole list (per-tensor Python checks cost ~10 us a parameter); only when they fail
    do the Python checks run, to raise the same message with the caller's positions. While tracing,
    the Python checks run (they handle symbolic shapes)."""
    if not torch.compiler.is_compiling():
        try:
            op(*args, False, **kwargs)  # maximize: not checked
            return
        except ValueError:
            python_check(*args, **kwargs, at=members)
            raise
    python_check(*args, **kwargs, at=members)


def adagrad(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], *, lr: float | Tensor,
            lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False,
            percentile_clipping: int = 100, skip_zeros: bool = False, block_size: int = 256,
            stochastic_rounding: bool = False) -> None:
    """One Adagrad step (ALGORITHM.md §2-§5) in place on params and states; one op call per
    (device, dtype, state kind, map). Every call is checked before the first one runs."""
    calls = plan(params, grads, states, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                 maximize=maximize, percentile_clipping=percentile_clipping, skip_zeros=skip_zeros,
                 block_size=block_size, stochastic_rounding=stochastic_rounding)
    for call in calls:
        call.run()
