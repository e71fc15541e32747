"""State-dict formats (ALGORITHM.md §7): ours, bitsandbytes 0.45 (flat) and 0.49+ (nested),
and torch.optim.Adagrad's; and the way back to torch.optim.Adagrad.

Loading builds the complete new state first and only then installs it, so a state dict that
does not fit raises a ValueError and leaves the optimizer as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torch_adagrad8 import qmap as Q

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


def saved_block(name: str, scales: int, n: int, group: dict) -> int:
    """The block size of loaded 8-bit state: its group's, when the state dict is ours (it has
    block_wise and block_size), else bitsandbytes' 256, else one scale per tensor; checked
    against the number of scales."""
    if "block_wise" in group and "block_size" in group:
        candidates = [group["block_size"] if group["block_wise"] else 0]
    else:
        candidates = [256, 0]
    for block in candidates:
        if Q.scale_count(n, block) == scales:
            return block
    raise ValueError(f"state of {name}: 'absmax1' has {scales} scales, which its block size "
                     f"({' or '.join(map(str, candidates))}; 0 = one per tensor) does not give for {n} elements")


def _check_param_state(name: str, state: Any, p: Tensor, group: dict) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"state of {name} must be a dict, got {type(state).__name__}")
    s = _flat(state)
    if "step" not in s:
        raise ValueError(f"state of {name} has no 'step'")
    n = real(p).numel()
    if "state1" in s and s["state1"].dtype == torch.uint8:
        for key in ("absmax1", "qmap1"):
            if key not in s:
                raise ValueError(f"state of {name} has 8-bit 'state1' but no '{key}'")
        if s["state1"].numel() != n:
            raise ValueError(f"state of {name}: 'state1' has {s['state1'].numel()} elements, the parameter {n}")
        if s["qmap1"].numel() != Q.MAP_SIZE:
            raise ValueError(f"state of {name}: 'qmap1' has {s['qmap1'].numel()} values, expected {Q.MAP_SIZE}")
        saved_block(name, s["absmax1"].numel(), n, group)
        return
    key = "state1" if "state1" in s else "sum" if "sum" in s else None
    if key is None:
        raise ValueError(f"state of {name} has no accumulator ('sum' or 'state1')")
    pairs = p.is_complex() and not s[key].is_complex() and s[key].numel() == 2 * p.numel()  # ours
    if not pairs and (s[key].numel() != p.numel() or s[key].is_complex() != p.is_complex()):
        raise ValueError(f"state of {name}: '{key}' has {s[key].numel()} elements of {s[key].dtype}, the parameter "
                         f"{p.numel()} of {p.dtype}")


def _converted(opt: "Adagrad", name: str, state: dict, p: Tensor, config: dict, saved_group: dict) -> dict:
    """The loaded state of p in this optimizer's format and kind, on p's device."""
    s = _flat(state)
    dev = p.device
    step = s["step"]
    new: dict = {"step": (step if isinstance(step, Tensor) else torch.tensor(float(step))).to(dev, torch.float32)
                 .reshape(())}
    eight_bit = opt._eight_bit(config, p)
    block = opt._block(config)
    loaded_codes = "state1" in s and s["state1"].dtype == torch.uint8
    source_block = saved_block(name, s["absmax1"].numel(), real(p).numel(), saved_group) if loaded_codes else 0
    if eight_bit and loaded_codes and source_block == block:
        # same layout: keep the codes, scales and map bit for bit
        qmap = opt._keep_map(s["qmap1"].to(dev, torch.float32).contiguous())
        new["state1"] = s["state1"].to(dev).reshape(real(p).shape).contiguous()
        new["absmax1"] = s["absmax1"].to(dev, torch.float32).contiguous()
        new["qmap1"] = qmap
    elif eight_bit:
        qmap = opt._map_on(config, dev)
        codes, absmax = Q.quantize(real(accumulator(s, p, source_block).to(dev)), qmap, block)
        new["state1"], new["absmax1"], new["qmap1"] = codes, absmax, qmap
    else:
        new["sum"] = real(accumulator(s, p, source_block).to(dev)).contiguous()
    # a missing clipping history or seed is made by the next step (the history then starts over)
    vec, seed = s.get("gnorm_vec"), s.get("seed")
    if config["percentile_clipping"] < 100 and vec is not None and vec.numel() == 100:
        new["gnorm_vec"] = vec.to(dev, torch.float32).clone()
    if config["stochastic_rounding"] and seed is not None:
        new["seed"] = seed.to(dev, torch.int64).reshape(())
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
                block = opt._block(opt.config_of(group, p))
                state[index_of[p]] = {"step": s["step"].detach().clone(), "sum": accumulator(s, p, block).clone()}
    return {"state": state, "param_groups": groups}
