"""State-dict formats (ALGORITHM.md §7): ours, bitsandbytes 0.45 (flat) and 0.49+ (nested),
and torch.optim.Adagrad's; and the way back to torch.optim.Adagrad.

Loading builds the complete new state first and only then installs it, so a state dict that
does not fit raises a ValueError and leaves the optimizer as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torch_adagrad8 import _checks, qmap as Q, sharded

if TYPE_CHECKING:
    from torch_adagrad8.optimizer import Adagrad

BNB_NESTED_KEY = "__bnb_optimizer_quant_state__"  # bitsandbytes >= 0.49 wraps its tensors here
TORCH_GROUP_DEFAULTS = dict(foreach=None, differentiable=False, fused=None)


def _flat(state: dict) -> dict:
    """A parameter's state with bitsandbytes' nested quantization state unwrapped."""
    if BNB_NESTED_KEY not in state:
        return dict(state)
    flat = {k: v for k, v in state.items() if k != BNB_NESTED_KEY}
    flat.update(state[BNB_NESTED_KEY])
    return flat


def real(t: Tensor) -> Tensor:
    """Complex tensors as float pairs (how the optimizers step and store them), others as they are."""
    return torch.view_as_real(t) if t.is_complex() else t


def accumulator(state: dict, p: Tensor, block: int) -> Tensor:
    """A parameter's accumulator as float32 (complex64 for complex parameters), from any format;
    block: the block size 8-bit state was made with (0: one scale for the tensor)."""
    s = _flat(state)
    if "state1" in s and s["state1"].dtype == torch.uint8:
        values = Q.dequantize(s["state1"], s["absmax1"].float(), s["qmap1"].float(), block)
        values = values.reshape(real(p).shape)
        return torch.view_as_complex(values) if p.is_complex() else values
    source = s["state1"] if "state1" in s else s["sum"]
    if p.is_complex() and not source.is_complex():  # our real pairs
        return torch.view_as_complex(source.float().reshape(real(p).shape).contiguous())
    return source.to(torch.complex64 if p.is_complex() else torch.float32).reshape(p.shape)


def saved_block(name: str, s: dict, n: int, group: dict) -> int:
    """The block size of loaded 8-bit state s (flat): the one it records (ours since it records
    it), else its group's when the state dict is ours (it has block_wise and block_size), else
    bitsandbytes' 256, else one scale per tensor; checked against its number of scales."""
    scales = s["absmax1"].numel()
    if "block_size" in s:
        candidates = [s["block_size"]]
    elif "block_wise" in group and "block_size" in group:
        candidates = [group["block_size"] if group["block_wise"] else 0]
    else:
        candidates = [256, 0]
    for block in candidates:
        if Q.scale_count(n, block) == scales:
            return block
    which = "its recorded block_size" if "block_size" in s else "its block size"
    raise ValueError(f"state of {name}: 'absmax1' has {scales} scales, which {which} "
                     f"({' or '.join(map(str, candidates))}; 0 = one per tensor) does not give for {n} elements")


# What only other optimizers save (torch's Adam(W), SGD, RMSprop, Adadelta; bitsandbytes' two-state
# optimizers): a state dict that has any of them is not an Adagrad's. bitsandbytes' one-state
# optimizers (RMSprop, Momentum, Lion) save the keys its Adagrad saves, but with nonzero betas.
FOREIGN_STATE_KEYS = ("state2", "exp_avg", "exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta")
FOREIGN_GROUP_KEYS = ("momentum", "dampening", "nesterov", "amsgrad", "centered", "rho")


def _check_group_source(gi: int, saved: dict) -> None:
    for key in FOREIGN_GROUP_KEYS:
        if key in saved:
            raise ValueError(f"parameter group {gi} of the state dict has '{key}': it is another optimizer's "
                             "state dict, not Adagrad's")
    betas = saved.get("betas", (0.0, 0.0))
    if not isinstance(betas, (tuple, list)) or any(b != 0 for b in betas):
        raise ValueError(f"parameter group {gi} of the state dict has betas={betas!r}: it is another optimizer's "
                         "state dict (bitsandbytes' Adagrad saves betas (0.0, 0.0))")


def _tensor(name: str, s: dict, key: str, what: str, ok) -> Tensor:
    t = s[key]
    if not isinstance(t, Tensor) or not ok(t):
        got = f"{str(t.dtype).removeprefix('torch.')} tensor" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"state of {name}: '{key}' must be {what}, got a {got}")
    return t


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def _check_param_state(name: str, state: Any, p: Tensor, group: dict) -> None:
    """Everything _converted reads, checked: keys, types, dtypes, sizes, and the values a valid
    state cannot hold (a map that is not sorted, negative or non-finite scales, a negative
    accumulator; NaN accumulator values are left alone: a non-finite gradient makes them, §6)."""
    if not isinstance(state, dict):
        raise ValueError(f"state of {name} must be a dict, got {type(state).__name__}")
    s = _flat(state)
    for key in FOREIGN_STATE_KEYS:
        if key in s:
            raise ValueError(f"state of {name} has '{key}': it is another optimizer's state, not Adagrad's")
    if "step" not in s:
        raise ValueError(f"state of {name} has no 'step'")
    step = s["step"]
    if not (isinstance(step, (int, float)) and not isinstance(step, bool)):
        _tensor(name, s, "step", "a number or a one-element real tensor", lambda t: t.numel() == 1 and not t.is_complex())
    if "seed" in s:
        _tensor(name, s, "seed", "a one-element integer tensor",
                lambda t: t.numel() == 1 and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool)
    n = real(p).numel()
    if "state1" in s and isinstance(s["state1"], Tensor) and s["state1"].dtype == torch.uint8:
        for key in ("absmax1", "qmap1"):
            if key not in s:
                raise ValueError(f"state of {name} has 8-bit 'state1' but no '{key}'")
        if s["state1"].numel() != n:
            raise ValueError(f"state of {name}: 'state1' has {s['state1'].numel()} elements, the parameter {n}")
        _tensor(name, s, "qmap1", "a floating-point tensor", _is_float)
        try:  # its size and values
            _checks.check_map(s["qmap1"], "qmap1")
        except ValueError as e:
            raise ValueError(f"state of {name}: {e}") from None
        absmax = _tensor(name, s, "absmax1", "a floating-point tensor", _is_float)
        if "block_size" in s:
            _checks.check_block_record(f"state of {name}: 'block_size'", s["block_size"])
        saved_block(name, s, n, group)
        if not bool((torch.isfinite(absmax) & (absmax >= 0)).all()):
            raise ValueError(f"state of {name}: 'absmax1' holds negative or non-finite scales")
        return
    key = "state1" if "state1" in s else "sum" if "sum" in s else None
    if key is None:
        raise ValueError(f"state of {name} has no accumulator ('sum' or 'state1')")
    acc = _tensor(name, s, key, "a floating-point (or complex) tensor", lambda t: t.is_floating_point() or t.is_complex())
    pairs = p.is_complex() and not acc.is_complex() and acc.numel() == 2 * p.numel()  # ours
    if not pairs and (acc.numel() != p.numel() or acc.is_complex() != p.is_complex()):
        raise ValueError(f"state of {name}: '{key}' has {acc.numel()} elements of {acc.dtype}, the parameter "
                         f"{p.numel()} of {p.dtype}")
    if not acc.is_complex() and bool((acc < 0).any()):
        raise ValueError(f"state of {name}: '{key}' holds negative values; an accumulator of squares cannot")


def _converted(opt: "Adagrad", name: str, state: dict, p: Tensor, config: dict, saved_group: dict) -> dict:
    """The loaded state of p in this optimizer's format and kind, on p's device: tensors of its
    own (stepping must never write into the state dict it was loaded from)."""
    s = _flat(state)
    eight_bit = opt._eight_bit(config, p)  # by the whole parameter's size, also for a shard of it
    loaded_codes = "state1" in s and s["state1"].dtype == torch.uint8
    source_block = saved_block(name, s, real(p).numel(), saved_group) if loaded_codes else 0
    if sharded.is_sharded(p):  # from here on: the rank's shard, its accumulator as float values
        s, p, loaded_codes = sharded.local_state(s, p, source_block), sharded.local(p), False
    dev = p.device
    step = s["step"]
    new: dict = {"step": (step if isinstance(step, Tensor) else torch.tensor(float(step))).to(dev, torch.float32)
                 .reshape(()).clone()}
    block = opt._block(config)
    if eight_bit and loaded_codes and Q.same_blocks(real(p).numel(), source_block, block):
        # same layout: keep the codes, scales and map bit for bit
        qmap = opt._keep_map(s["qmap1"].to(dev, torch.float32).contiguous())
        new["state1"] = s["state1"].to(dev).reshape(real(p).shape).clone(memory_format=torch.contiguous_format)
        new["absmax1"] = s["absmax1"].to(dev, torch.float32).clone(memory_format=torch.contiguous_format)
        new["qmap1"] = qmap
    elif eight_bit:
        qmap = opt._map_on(config, dev)
        codes, absmax = Q.quantize(real(accumulator(s, p, source_block).to(dev)), qmap, block)
        new["state1"], new["absmax1"], new["qmap1"] = codes, absmax, qmap
    else:
        new["sum"] = real(accumulator(s, p, source_block).to(dev)).clone(memory_format=torch.contiguous_format)
    if eight_bit:
        new["block_size"] = block
    # a missing clipping history or seed is made by the next step (the history then starts over)
    vec, seed = s.get("gnorm_vec"), s.get("seed")
    if config["percentile_clipping"] < 100 and vec is not None and vec.numel() == 100:
        new["gnorm_vec"] = vec.to(dev, torch.float32).clone()
    if config["stochastic_rounding"] and seed is not None:
        new["seed"] = seed.to(dev, torch.int64).reshape(()).clone()
    return new


def load_state_dict(opt: "Adagrad", state_dict: dict) -> None:
    """Load any supported format into opt (see the module docstring)."""
    from torch_adagrad8.optimizer import validate_config

    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("a state dict needs 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"the state dict has {len(saved_groups)} parameter groups, the optimizer "
                         f"{len(opt.param_groups)}")
    new_groups = []
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        _check_group_source(gi, saved)
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"parameter group {gi} has {len(saved['params'])} parameters in the state dict and "
                             f"{len(group['params'])} in the optimizer")
        # every saved key but the parameters (schedulers keep e.g. initial_lr there); the known ones
        # are validated; torch's own flags (foreach, fused, ...) mean nothing here
        merged = {**group, **{k: v for k, v in saved.items()
                              if k not in ("params", "param_names", *TORCH_GROUP_DEFAULTS)}}
        validate_config(merged)
        opt._check_bits(merged["optim_bits"])
        new_groups.append(merged)

    listed = {key for saved in saved_groups for key in saved["params"]}
    unlisted = [key for key in state_dict["state"] if key not in listed]
    if unlisted:
        raise ValueError(f"the state dict has state for parameter ids {unlisted[:5]}, which no parameter group lists")
    new_state: dict = {}
    for gi, (group, saved) in enumerate(zip(new_groups, saved_groups)):
        for pi, (p, key) in enumerate(zip(group["params"], saved["params"])):
            if key not in state_dict["state"]:
                continue  # never stepped
            name = opt._name(gi, pi)
            _check_param_state(name, state_dict["state"][key], p, saved)
            new_state[p] = _converted(opt, name, state_dict["state"][key], p, opt.config_of(group, p), saved)

    # nothing has failed: install
    for group, merged in zip(opt.param_groups, new_groups):
        lr = merged.pop("lr")
        if isinstance(group["lr"], Tensor):  # a tensor lr stays the same tensor (compiled steps read it)
            group["lr"].copy_(lr) if isinstance(lr, Tensor) else group["lr"].fill_(lr)
        else:
            group["lr"] = lr.detach().clone() if isinstance(lr, Tensor) else lr  # never the state dict's
        group.update(merged)
    opt.state.clear()
    opt.state.update(new_state)


def unsharded_state_dict(opt: "Adagrad", state_dict: dict) -> dict:
    """state_dict (torch's packing of opt's state) with the state of every sharded parameter
    replaced by one unsharded optimizer's (sharded.global_state), and every map a copy: a map is
    shared by many states and cached by its name, and torch.distributed.checkpoint loads into a
    state dict's tensors in place."""
    for gi, (group, packed) in enumerate(zip(opt.param_groups, state_dict["param_groups"])):
        for pi, (p, index) in enumerate(zip(group["params"], packed["params"])):
            state = opt.state.get(p)
            if not state:
                continue
            if sharded.is_sharded(p):
                state = sharded.global_state(state, p, opt._state_block(group, p, state), opt._name(gi, pi))
            if "qmap1" in state:
                state = {**state, "qmap1": state["qmap1"].clone()}
            state_dict["state"][index] = state
    return state_dict


def torch_state_dict(opt: "Adagrad") -> dict:
    """opt's state as torch.optim.Adagrad's state dict (8-bit state dequantized)."""
    index_of = {}
    groups = []
    for group in opt.param_groups:
        ids = []
        for p in group["params"]:
            index_of[p] = len(index_of)
            ids.append(index_of[p])
        groups.append({"lr": group["lr"], "lr_decay": group["lr_decay"], "weight_decay": group["weight_decay"],
                       "initial_accumulator_value": group["initial_accumulator_value"], "eps": group["eps"],
                       "maximize": group["maximize"], **TORCH_GROUP_DEFAULTS, "params": ids})
    state = {}
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            if opt.state.get(p):
                s = opt.state[p]
                local = sharded.local(p)
                acc = accumulator(s, local, opt._state_block(group, p, s)).clone()
                state[index_of[p]] = {"step": s["step"].detach().clone(),
                                      "sum": sharded.like_param(acc, p) if local is not p else acc}
    return {"state": state, "param_groups": groups}
