"""Adagrad, Adagrad8bit and Adagrad32bit: bitsandbytes' API on the adagrad8 ops.

The optimizers only organise: they keep per-parameter state, group the parameters that have
a gradient by (param group, device, dtype, state kind, effective config), and make one op call
per group. All math is in the ops (ALGORITHM.md §2-§5).

State of a parameter (tensors on the parameter's device, and one int):
  step       float32 scalar: steps taken
  sum        32-bit state: float32 accumulator (complex parameters: float32 real pairs, [..., 2])
  state1     8-bit state: uint8 codes;  absmax1: float32 scales;  qmap1: float32 map (256)
  block_size 8-bit state: the int block size it is in (0: one scale per tensor); a step whose
             config asks for other blocks raises, a loaded state is converted to the config's
  gnorm_vec  float32 (100,): recent squared gradient norms (percentile clipping)
  seed       int64 scalar: stochastic-rounding seed
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from torch_adagrad8 import _checks, checkpoint, functional as F, qmap as Q, sharded
from torch_adagrad8.checkpoint import real as _real
from torch_adagrad8.manager import GlobalOptimManager

# Config that bitsandbytes reads from `args` (they override the keyword arguments).
ARGS_KEYS = ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "max_unorm", "skip_zeros")
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.complex64)
# A position in one of the lists of functional.plan's messages ("params[2]", "states[0]", ...):
# the ops' list arguments (read from their schemas) and plan's own `states`. Not qmap: qmap[40]
# is a map entry.
_LISTS = sorted({arg.name for op in (torch.ops.adagrad8.step.default, torch.ops.adagrad8.step.quantized,
                                     torch.ops.adagrad8.percentile_clip.default)
                 for arg in op._schema.arguments if "List[Tensor]" in str(arg.type)} | {"states"})  # also Optional
_LIST_INDEX = re.compile(rf"\b(?:{'|'.join(_LISTS)})\[(\d+)\]")


def validate_config(config: dict) -> None:
    """ValueError naming the first bad value of a group's (or a parameter's) config."""
    _checks.check_lr(config["lr"])
    for key in ("lr_decay", "weight_decay", "eps", "initial_accumulator_value", "optim_bits", "percentile_clipping",
                "min_8bit_size", "block_size"):
        _checks.check_option(key, config[key])
    if config["max_unorm"] not in (0, 0.0, None):
        raise ValueError(
            f"max_unorm={config['max_unorm']!r} is not supported by torch_adagrad8's Adagrad (bitsandbytes "
            "does not apply it to Adagrad either); use 0"
        )
    qm = config["qmap"]
    if isinstance(qm, Tensor):  # its values are checked once, when _map_on first copies it
        if not qm.is_floating_point() or qm.numel() != Q.MAP_SIZE:
            raise ValueError(f"Invalid qmap: a tensor qmap must be floating-point with {Q.MAP_SIZE} values")
    elif qm not in Q.MAPS:
        names = ", ".join(repr(name) for name in Q.MAPS)
        raise ValueError(f"Invalid qmap: {qm!r} (must be one of {names} or a sorted float32 tensor of 256)")
    for key in ("block_wise", "skip_zeros", "maximize", "stochastic_rounding"):
        _checks.check_option(key, config[key])


class Adagrad(torch.optim.Optimizer):
    """Adagrad with 32-bit or 8-bit state; bitsandbytes 0.45 signature plus keyword-only extras.

    Extras: maximize; qmap ("tapered" (default), "dynamic" (alias "unsigned") and "signed" =
    bitsandbytes' maps, or a tensor);
    stochastic_rounding; block_size (elements per 8-bit scale, default 256); skip_zeros; seed
    (base of the stochastic-rounding seeds).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        *,
        maximize: bool = False,
        qmap: str | Tensor = Q.DEFAULT_MAP,
        stochastic_rounding: bool = False,
        block_size: int = 256,
        skip_zeros: bool = False,
        max_unorm: float = 0.0,
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
            optim_bits=optim_bits, min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping,
            block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros, qmap=qmap,
            stochastic_rounding=stochastic_rounding, block_size=block_size,
        )
        if args is not None:  # bitsandbytes: args' fields replace the keyword arguments
            for key in ARGS_KEYS:
                if hasattr(args, key):
                    defaults[key] = getattr(args, key)
        validate_config(defaults)
        self._check_bits(defaults["optim_bits"])
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r} (must be an int)")
        self.seed = seed
        self.mng = GlobalOptimManager.get_instance()
        self._step_called = [False]  # backs _opt_called
        self._maps: dict = {}  # (named map's builder or tensor id, device) -> the map tensor its states share
        self._map_sources: list = []  # custom map tensors, kept alive so that their ids stay keys
        self._lr_tensors: dict = {}  # eager steps: (group, lr key) -> functional.lr_tensor's cache
        super().__init__(params, defaults)
        # state_dict(): the state of sharded (DTensor) parameters as one unsharded optimizer's, with
        # DTensors where it is sharded (torch_adagrad8.sharded; a collective for 8-bit state: every
        # rank calls it, as torch.distributed.checkpoint does), and maps copied. First, so that the
        # user's hooks see that form.
        self.register_state_dict_post_hook(checkpoint.unsharded_state_dict, prepend=True)

    # An LR scheduler reads optimizer._opt_called to warn when it is stepped before the optimizer.
    # Its wrapper of step() that sets it is bypassed by a step compiled before the scheduler was
    # attached (docs/compile.md), so step() sets it too. torch.compile silently drops attribute
    # writes to an optimizer inside a compiled step but keeps list writes: the flag is in a list.
    @property
    def _opt_called(self) -> bool:
        return self._step_called[0]

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._step_called[0] = bool(value)

    def _check_bits(self, optim_bits: int) -> None:
        """Adagrad8bit / Adagrad32bit refuse the other width."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_config(group)
            self._check_bits(group["optim_bits"])
            for i, p in enumerate(group["params"]):
                self._check_dtype(len(self.param_groups) - 1, i)
                self._map_on(group, p.device)  # made here, not inside a (compiled) step
        except ValueError:
            self.param_groups.pop()
            raise

    # ---- configuration -----------------------------------------------------------------

    def _name(self, gi: int, pi: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        p = group["params"][pi]
        where = f"'{names[pi]}'" if names else f"param_groups[{gi}]['params'][{pi}]"
        return f"parameter {where} (shape {list(p.shape)})"

    def _check_dtype(self, gi: int, pi: int) -> None:
        p = self.param_groups[gi]["params"][pi]
        if p.dtype not in _PARAM_DTYPES:
            raise ValueError(f"{self._name(gi, pi)} has dtype {p.dtype}; torch_adagrad8 steps float32, float16, "
                             "bfloat16 and complex64 parameters")

    def config_of(self, group: dict, p: Tensor) -> dict:
        """The group's config with GlobalOptimManager's overrides for p applied."""
        overrides = self.mng.overrides_for(p)
        if not overrides:
            return group
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise ValueError(f"GlobalOptimManager overrides {unknown} for a parameter, but {type(self).__name__} has "
                             f"no such option (it has {sorted(self.defaults)})")
        config = {**group, **overrides}
        validate_config(config)
        return config

    @staticmethod
    def _eight_bit(config: dict, p: Tensor) -> bool:
        return config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]

    @staticmethod
    def _block(config: dict) -> int:
        return config["block_size"] if config["block_wise"] else 0

    def _state_block(self, group: dict, p: Tensor, state: dict) -> int:
        """The block size p's 8-bit state is in: the one it records, else its config's."""
        return state["block_size"] if "block_size" in state else self._block(self.config_of(group, p))

    # ---- state ---------------------------------------------------------------------------

    def _map_on(self, config: dict, device: torch.device) -> Tensor:
        """One shared map tensor per (map, device), so parameters can share an op call."""
        qm = config["qmap"]
        maps = self._maps
        key = (Q.MAPS[qm] if isinstance(qm, str) else id(qm), device)  # aliases share a tensor
        if key not in maps:
            if not isinstance(qm, str):
                try:
                    _checks.check_map(qm)
                except ValueError as e:
                    raise ValueError(f"Invalid qmap: {e}") from None
                self._map_sources.append(qm)
            maps[key] = (Q.MAPS[qm]() if isinstance(qm, str) else qm.detach().float()).to(device).contiguous()
        return maps[key]

    def _keep_map(self, qmap: Tensor) -> Tensor:
        """Keep a map that came with a loaded state (bitsandbytes' or a custom one)."""
        maps = self._maps
        for name in Q.MAPS:  # compared on qmap's device with the cached named maps (built once each)
            named = self._map_on({"qmap": name}, qmap.device)
            if torch.equal(named, qmap):
                return named
        for t in maps.values():  # the same custom map as another state's: share it
            if t.device == qmap.device and torch.equal(t, qmap):
                return t
        key = ("loaded", len(maps), qmap.device)
        maps[key] = qmap = qmap.clone()  # not the state dict's tensor
        return qmap

    def _new_state(self, p: Tensor, config: dict, index: int) -> dict:
        """The state a parameter starts with (complex parameters: as real pairs, both parts
        starting at initial_accumulator_value, like torch)."""
        eight_bit = self._eight_bit(config, p)
        block = self._block(config)
        state = F.build_state(_real(sharded.local(p)), 8 if eight_bit else 32, float(config["initial_accumulator_value"]),
                              block, self._map_on(config, p.device) if eight_bit else None, 100, None)
        if eight_bit:
            state["block_size"] = block
        return {**state, **self._missing_state(p, state, config, index)}

    def _missing_state(self, p: Tensor, state: dict, config: dict, index: int) -> dict:
        """Clipping history and seed the config needs and the state lacks: also when clipping or
        stochastic rounding is turned on after the state exists (an override, a loaded state);
        the history then starts over."""
        extra = {}
        if config["percentile_clipping"] < 100 and "gnorm_vec" not in state:
            extra["gnorm_vec"] = F.new_history(p.device)
        if config["stochastic_rounding"] and "seed" not in state:
            extra["seed"] = self._seed(index, p.device)
        return extra

    def _seed(self, index: int, device: torch.device) -> Tensor:
        """The stochastic-rounding seed of the index-th parameter (in param_groups order)."""
        return torch.tensor(self.seed * 1_000_003 + index, dtype=torch.int64, device=device)

    # ---- state dicts ---------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads our own format, bitsandbytes' (0.45 flat, 0.49+ nested) or torch.optim.Adagrad's.

        The state is converted to this optimizer's kind for each parameter (8-bit state keeps its
        codes, scales and map when the block layout matches). A state dict that does not fit
        raises ValueError and changes nothing.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        checkpoint.load_state_dict(self, state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def torch_state_dict(self) -> dict:
        """This optimizer's state as a torch.optim.Adagrad state dict (8-bit state dequantized)."""
        return checkpoint.torch_state_dict(self)

    # ---- step ----------------------------------------------------------------------------

    def _lr_key(self, group: dict, p: Tensor, config: dict) -> Any:
        """What tells p's lr apart from the other lrs of its group, for grouping op calls. Never the
        group's own lr value: a float lr that a scheduler changes would then be guarded on by
        torch.compile and recompile every step (as a dict key it cannot stay symbolic)."""
        if config is group or "lr" not in self.mng.overrides_for(p):
            return "group"
        lr = config["lr"]
        return ("override", id(lr) if isinstance(lr, Tensor) else lr)

    def _check_grads(self) -> list[tuple[int, int, dict, Tensor, Tensor, Tensor, dict, Optional[dict], int]]:
        """(group index, index in the group, group, param, its local tensor, the gradient the op reads
        (local, as real numbers, contiguous), config, state or None, flat index) of every parameter to
        step. Raises before anything is written. A state's kind (8- or 32-bit) is fixed when it is
        created; whether it still fits a changed config is checked by functional.op_calls (the recorded
        block size) and the op (the scale count), and named by _check_state_fits when one of them
        fails (also under torch.compile: tests/test_compile.py). (Runs per
        parameter on every eager step: the common case is kept to a few attribute reads and one state
        lookup.)"""
        todo = []
        index = -1
        overrides = self.mng.has_overrides()
        states = self.state
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                index += 1
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError(f"{self._name(gi, pi)} has a sparse gradient; torch_adagrad8 supports dense "
                                     "gradients only")
                if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    raise ValueError(f"{self._name(gi, pi)} has a gradient of dtype {g.dtype}, shape "
                                     f"{list(g.shape)} on {g.device}; expected {p.dtype}, {list(p.shape)} on "
                                     f"{p.device}")
                if p.dtype not in _PARAM_DTYPES:
                    self._check_dtype(gi, pi)
                config = self.config_of(group, p) if overrides else group
                local = p
                if sharded.is_sharded(p):
                    self._check_sharded(gi, pi, config)
                    local, g = p.to_local(), g.to_local()
                todo.append((gi, pi, group, p, local, _real(g).contiguous(), config, states.get(p), index))
        return todo

    def _check_sharded(self, gi: int, pi: int, config: dict) -> None:
        """What stepping a DTensor parameter's local shard needs."""
        p = self.param_groups[gi]["params"][pi]
        if tuple(p.grad.placements) != tuple(p.placements):
            raise ValueError(f"{self._name(gi, pi)} is a DTensor placed {tuple(p.placements)} but its gradient is placed "
                             f"{tuple(p.grad.placements)}; the step needs the gradient of its own shard")
        if config["percentile_clipping"] < 100:
            raise ValueError(f"{self._name(gi, pi)} is sharded (a DTensor); percentile_clipping needs whole "
                             "gradient norms, which a shard does not have: use percentile_clipping=100")

    def _check_state_fits(self, gi: int, pi: int, config: dict, state: dict, local: Tensor) -> None:
        """A config changed after the 8-bit state was made must not ask for other blocks. (The
        functional and op checks find it; this one, run when they fail, names the config.)"""
        if "absmax1" not in state:
            return
        n, block = _real(local).numel(), self._block(config)
        made = state.get("block_size", block)
        asked = f"block_wise={config['block_wise']}, block_size={config['block_size']}"
        if not Q.same_blocks(n, made, block):
            layout = f"is in blocks of {made} elements" if made else "has one scale for the whole tensor"
            raise ValueError(f"{self._name(gi, pi)}: its 8-bit state {layout}, which {asked} does not give")
        if state["absmax1"].numel() != Q.scale_count(n, block):
            raise ValueError(f"{self._name(gi, pi)}: its 8-bit state has {state['absmax1'].numel()} scales, which "
                             f"{asked} does not give")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim.Optimizer.zero_grad, in a form torch.compile traces (it skips the base
        class's), so that a compiled training step can call it."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        calls: dict[tuple, list] = {}
        additions: dict[Tensor, dict] = {}  # new state entries, installed once every call is checked
        group_keys: dict[int, tuple] = {}  # the key of a group's parameters that take its own config
        for gi, pi, group, p, local, grad, config, state, index in self._check_grads():
            if state:
                extra = self._missing_state(p, state, config, index)
                if extra:
                    state = {**state, **extra}
            else:
                extra = state = self._new_state(p, config, index)
            if extra:
                additions[p] = extra
            if config is group:
                key = group_keys.get(gi)
                if key is None:
                    key = group_keys[gi] = self._call_key(gi, group, p, config)
            else:
                key = self._call_key(gi, group, p, config)
            calls.setdefault(key, []).append((p, local, grad, state, config, (gi, pi)))

        # Everything is checked before anything is written: arguments of every call first.
        prepared = [self._prepare_call(members, self._lr_cache(key)) for key, members in calls.items()]
        self._check_overlaps(prepared)
        for p, extra in additions.items():
            self.state[p].update(extra)
        for _, op_calls, copies in prepared:
            self._run_calls(op_calls, copies)
        self._step_called[0] = True  # _opt_called
        return loss

    def _call_key(self, gi: int, group: dict, p: Tensor, config: dict) -> tuple:
        """What parameters that share an op call share: every constant of a step. (functional.plan
        splits them further by device, dtype, state kind and map.)"""
        return (gi, config["lr_decay"], config["weight_decay"], config["eps"], config["maximize"],
                config["skip_zeros"], config["percentile_clipping"], self._block(config),
                config["stochastic_rounding"], self._lr_key(group, p, config))

    def _lr_cache(self, key: tuple) -> Optional[dict]:
        """functional.lr_tensor's cache for the calls of one key's group and lr. None while tracing (a
        float lr is a graph input there) and under a dispatch mode (a fake tensor made there must not
        serve a real step, nor a real one a fake step)."""
        if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
            return None
        caches = self._lr_tensors
        if len(caches) > 64:  # per-parameter lr overrides, each new float a new key
            caches.clear()
        return caches.setdefault((key[0], key[-1]), {})

    def _prepare_call(self, members: list, lr_cache: Optional[dict]) -> tuple:
        """The checked op calls of parameters that share every constant of a step.

        A complex or non-contiguous parameter steps through a contiguous real copy that is copied
        back afterwards (a view of it would not survive torch.compile's functionalization)."""
        config = members[0][4]
        params = [_writable(local) for _, local, _, _, _, _ in members]
        try:
            calls = F.op_calls(params, [grad for _, _, grad, _, _, _ in members],
                               [state for _, _, _, state, _, _ in members], lr=config["lr"], lr_decay=config["lr_decay"],
                               weight_decay=config["weight_decay"], eps=config["eps"], maximize=config["maximize"],
                               percentile_clipping=config["percentile_clipping"], skip_zeros=config["skip_zeros"],
                               block_size=self._block(config), stochastic_rounding=config["stochastic_rounding"],
                               lr_cache=lr_cache)
        except ValueError as e:
            for _, local, _, state, member_config, (gi, pi) in members:  # a config changed since: say which
                self._check_state_fits(gi, pi, member_config, state, local)
            raise self._named(e, members) from None
        copies = [(local, work) for (_, local, _, _, _, _), work in zip(members, params) if work is not local]
        return members, calls, copies

    def _check_overlaps(self, prepared: list) -> None:
        """No parameter or state tensor of the step may share memory with another tensor of it,
        across every call of every group (functional.check_overlaps)."""
        everyone, calls, offsets = [], [], []
        for members, member_calls, _ in prepared:
            calls += member_calls
            offsets += [len(everyone)] * len(member_calls)
            everyone += members
        try:
            F.check_overlaps(calls, offsets)
        except ValueError as e:
            raise self._named(e, everyone) from None

    def _named(self, e: ValueError, members: list) -> ValueError:
        """e, whose message names tensors by their positions in members, with a legend naming the
        parameters behind them."""
        positions = sorted({int(i) for i in _LIST_INDEX.findall(str(e)) if int(i) < len(members)})
        legend = "; ".join(f"[{i}] is {self._name(*members[i][5])}" for i in positions)
        return ValueError(f"{e} ({legend})" if legend else str(e))

    @staticmethod
    def _run_calls(calls: list, copies: list) -> None:
        for call in calls:
            call.run()
        for p, work in copies:  # the parameters stepped through a copy: write the result back
            p.copy_(torch.view_as_complex(work) if p.is_complex() else work)


def _writable(p: Tensor) -> Tensor:
    """The tensor the op updates for p: p itself, or a contiguous real copy of a complex or
    strided (e.g. channels_last) parameter, which the step copies back."""
    if p.is_complex():
        return torch.view_as_real(p).clone(memory_format=torch.contiguous_format)
    return p if p.is_contiguous() else p.contiguous()


class Adagrad8bit(Adagrad):
    """Adagrad with 8-bit state (tensors under min_8bit_size elements keep 32-bit state)."""

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 optim_bits=8, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, **kwargs):
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, optim_bits, args,
                         min_8bit_size, percentile_clipping, block_wise, **kwargs)

    def _check_bits(self, optim_bits: int) -> None:
        if optim_bits != 8:
            raise ValueError(f"Adagrad8bit keeps 8-bit state; got optim_bits={optim_bits} (use Adagrad32bit)")


class Adagrad32bit(Adagrad):
    """Adagrad with float32 state."""

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, **kwargs):
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, optim_bits, args,
                         min_8bit_size, percentile_clipping, block_wise, **kwargs)

    def _check_bits(self, optim_bits: int) -> None:
        if optim_bits != 32:
            raise ValueError(f"Adagrad32bit keeps 32-bit state; got optim_bits={optim_bits} (use Adagrad8bit)")
