"""Bad input at every entry point of the optimizers and of functional: each case raises a
ValueError that names the argument and the problem, and leaves the parameters, their gradients,
the optimizer's state and its param_groups byte-identical to before the call. (The op-level
catalogue, eager and under torch.compile, is tests/test_bad_input.py.)"""

from __future__ import annotations

import copy

import pytest
import torch

import torch_adagrad8 as A
from torch_adagrad8 import functional as F, qmap as Q


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """t's bytes (so that NaN payloads and -0.0 count)."""
    t = t.detach().to_dense() if t.is_sparse else t.detach()
    return t.reshape(-1).contiguous().view(torch.uint8)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device \
            and torch.equal(_bytes(a), _bytes(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN options compare equal to themselves


def _snapshot(opt, params) -> dict:
    return copy.deepcopy(dict(
        params=[p.detach() for p in params],
        grads=[p.grad for p in params],
        state=[dict(opt.state[p]) if p in opt.state else None for p in params],
        groups=[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        members=[[next((i for i, q in enumerate(params) if q is p), None) for p in g["params"]]
                 for g in opt.param_groups],
    ))


def _trained():
    """An Adagrad8bit two steps in: w (12 elements) keeps 32-bit state; v (300) and e (5000) have
    8-bit state, e in a second group; percentile clipping on. Fresh gradients are set."""
    gen = torch.Generator().manual_seed(0)
    w, v, e = (torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((3, 4), (300,), (5000,)))
    params = [w, v, e]
    opt = A.Adagrad8bit([{"params": [w, v]}, {"params": [e], "lr": 0.05}], lr=0.1, min_8bit_size=256,
                        percentile_clipping=90)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if _ < 2:
            opt.step()
    return opt, params


def _unsorted(qmap: torch.Tensor) -> torch.Tensor:
    q = qmap.clone()
    q[[40, 41]] = q[[41, 40]]
    return q


def _set_state(i, key, value):
    def fault(opt, params):
        opt.state[params[i]][key] = value(opt.state[params[i]][key], params[i])
        return opt.step
    return fault


def _put_state(i, key, source):
    """state[key] of params[i] set to source(opt, params): a tensor another argument owns."""
    def fault(opt, params):
        opt.state[params[i]][key] = source(opt, params)
        return opt.step
    return fault


def _set_grad(i, value):
    """torch itself refuses a .grad of another dtype or shape: set through grad_dtype and .data."""
    def fault(opt, params):
        p, g = params[i], value(params[i])
        p.grad_dtype = None
        if g.shape == p.shape or g.is_sparse:
            p.grad = g
        else:
            p.grad = torch.zeros_like(p)
            p.grad.data = g
        return opt.step
    return fault


def _set_group(gi, key, value):
    def fault(opt, params):
        opt.param_groups[gi][key] = value
        return opt.step
    return fault


def _add_group(group):
    def fault(opt, params):
        return lambda: opt.add_param_group(group(params))
    return fault


def _load(edit):
    """load_state_dict of the optimizer's own state dict (saved one step earlier), edited."""
    def fault(opt, params):
        sd = opt.state_dict()
        opt.step()
        for p in params:
            p.grad = torch.randn_like(p)
        edit(sd)
        return lambda: opt.load_state_dict(sd)
    return fault


def _edit_state(index, key, value):
    def edit(sd):
        sd["state"][index][key] = value(sd["state"][index][key])
    return edit


def _foreign_group(**options):
    def edit(sd):
        sd["param_groups"][0].update(options)
    return edit


def _adam_state(sd):
    """torch.optim.Adam's state dict over the same parameters."""
    for s in sd["state"].values():
        s.pop("sum", None), s.pop("state1", None)
        s["exp_avg"] = s["exp_avg_sq"] = torch.zeros(1)
    for g in sd["param_groups"]:
        g.update(betas=(0.9, 0.999), amsgrad=False)


GRAD = r"parameter param_groups\[0\]\['params'\]\[1\] \(shape \[300\]\)"

# (id, fault, message regex). A fault edits the trained optimizer and returns the failing call.
CASES = [
    # ---- step: gradients
    ("grad-dtype", _set_grad(1, lambda p: torch.randn(300, dtype=torch.float64)),
     GRAD + r" has a gradient of dtype torch.float64, shape \[300\] on cpu; expected torch.float32"),
    ("grad-shape", _set_grad(1, lambda p: torch.randn(30, 10)), GRAD + r" has a gradient of dtype torch.float32, shape \[30, 10\]"),
    ("grad-sparse", _set_grad(1, lambda p: torch.randn(300).to_sparse()), GRAD + " has a sparse gradient"),
    ("grad-aliases-param", _set_grad(1, lambda p: p.detach()),
     r"^params\[1\] and grads\[1\] overlap in memory; .*\(\[1\] is " + GRAD + r"\)$"),
    # ---- step: state
    ("sum-dtype", _set_state(0, "sum", lambda t, p: t.double()), r"^state_sums\[0\] has dtype float64 but must be float32"),
    ("sum-shape", _set_state(0, "sum", lambda t, p: t.reshape(-1)), r"^state_sums\[0\] has shape \[12\] but params\[0\]"),
    ("sum-aliases-param", _set_state(0, "sum", lambda t, p: p.detach()), r"^params\[0\] and state_sums\[0\] overlap in memory"),
    ("codes-dtype", _set_state(1, "state1", lambda t, p: t.to(torch.int8)), r"^codes\[1\] has dtype int8 but must be uint8 \(\[1\] is " + GRAD + r"\)$"),
    ("codes-noncontiguous", _set_state(2, "state1", lambda t, p: t.repeat_interleave(2)[::2]),
     r"^codes\[0\] must be contiguous \(\[0\] is parameter param_groups\[1\]\['params'\]\[0\] \(shape \[5000\]\)\)$"),
    ("absmax-count", _set_state(2, "absmax1", lambda t, p: t[:-1].clone()),
     r"param_groups\[1\]\['params'\]\[0\] \(shape \[5000\]\): its 8-bit state has 19 scales"),
    ("absmax-dtype", _set_state(2, "absmax1", lambda t, p: t.half()), r"^absmax\[0\] must be a contiguous float32 tensor"),
    ("map-unsorted", _set_state(1, "qmap1", lambda t, p: _unsorted(t)), r"^qmap\[40\] = .* > qmap\[41\] = .*; map values must"),
    ("map-length", _set_state(1, "qmap1", lambda t, p: t[:128]), r"^qmap must be a contiguous float32 tensor of 256 elements"),
    ("step-dtype", _set_state(0, "step", lambda t, p: t.long()), r"^steps\[0\] must hold one float32 value, got int64"),
    ("step-shape", _set_state(1, "step", lambda t, p: t.repeat(2)), r"^steps\[1\] must hold one float32 value, got float32 with 2"),
    ("gnorm-vec-shape", _set_state(1, "gnorm_vec", lambda t, p: t[:50]), r"^gnorm_vecs\[1\] must be a contiguous float32 tensor"),
    # state that shares memory across parameters and calls (w, v and e are stepped by three op
    # calls; the step counts and clipping histories are written by the step, not by the ops)
    ("step-shared-across-groups", _put_state(2, "step", lambda opt, ps: opt.state[ps[1]]["step"]),
     r"^states\[1\]\['step'\] and states\[2\]\['step'\] overlap in memory; a tensor the step writes must not share "
     r"memory with another argument \(\[1\] is " + GRAD + r"; \[2\] is parameter param_groups\[1\]\['params'\]\[0\] "
     r"\(shape \[5000\]\)\)$"),
    ("step-shared-in-group", _put_state(1, "step", lambda opt, ps: opt.state[ps[0]]["step"]),
     r"^states\[0\]\['step'\] and states\[1\]\['step'\] overlap in memory"),
    ("step-inside-grad", _put_state(1, "step", lambda opt, ps: ps[1].grad[7]),
     r"^states\[1\]\['step'\] and grads\[1\] overlap in memory; .*\(\[1\] is " + GRAD + r"\)$"),
    ("gnorm-vec-inside-param", _put_state(2, "gnorm_vec", lambda opt, ps: ps[2].detach()[100:200]),
     r"^params\[2\] and states\[2\]\['gnorm_vec'\] overlap in memory"),
    ("gnorm-vec-inside-other-state", _put_state(1, "gnorm_vec", lambda opt, ps: opt.state[ps[2]]["state1"][:400].view(torch.float32)),
     r"^states\[1\]\['gnorm_vec'\] and states\[2\]\['state1'\] overlap in memory"),
    # ---- step: options changed after construction
    ("lr-nan", _set_group(0, "lr", float("nan")), r"^Invalid lr: nan"),
    ("lr-negative", _set_group(1, "lr", -0.1), r"^Invalid lr: -0.1"),
    ("weight-decay-negative", _set_group(0, "weight_decay", -1e-4), r"^Invalid weight_decay: -0.0001"),
    ("eps-nan", _set_group(1, "eps", float("nan")), r"^Invalid eps: nan"),
    ("lr-decay-inf", _set_group(0, "lr_decay", float("inf")), r"^Invalid lr_decay: inf"),
    ("block-size-changed", _set_group(1, "block_size", 128), r"its 8-bit state is in blocks of 256 elements, which block_wise=True, block_size=128 does not give"),
    # ---- add_param_group
    ("add-lr-negative", _add_group(lambda ps: {"params": [torch.nn.Parameter(torch.randn(4))], "lr": -1.0}), r"^Invalid lr: -1.0"),
    ("add-param-dtype", _add_group(lambda ps: {"params": [torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]}),
     r"parameter param_groups\[2\]\['params'\]\[0\] \(shape \[4\]\) has dtype torch.float64"),
    ("add-param-twice", _add_group(lambda ps: {"params": [ps[0]]}), "some parameters appear in more than one parameter group"),
    ("add-map-unsorted", _add_group(lambda ps: {"params": [torch.nn.Parameter(torch.randn(4))],
                                                "qmap": _unsorted(Q.tapered_map())}),
     r"^Invalid qmap: qmap\[40\] = .* > qmap\[41\]"),
    ("add-map-nan", _add_group(lambda ps: {"params": [torch.nn.Parameter(torch.randn(4))],
                                           "qmap": Q.tapered_map().index_fill(0, torch.tensor([3]), float("nan"))}),
     r"^Invalid qmap: qmap\[3\] is nan"),
    ("add-optim-bits", _add_group(lambda ps: {"params": [torch.nn.Parameter(torch.randn(4))], "optim_bits": 32}),
     "Adagrad8bit keeps 8-bit state; got optim_bits=32"),
    # ---- load_state_dict (more shapes and missing keys: tests/test_state_dict.py)
    ("load-sum-dtype", _load(_edit_state(0, "sum", lambda t: t.long())),
     r"'sum' must be a floating-point \(or complex\) tensor, got a int64 tensor"),
    ("load-sum-negative", _load(_edit_state(0, "sum", lambda t: -t)), r"'sum' holds negative values"),
    ("load-sum-not-a-tensor", _load(_edit_state(0, "sum", lambda t: t.tolist())), r"'sum' must be a floating-point .* got a list"),
    ("load-codes-shape", _load(_edit_state(2, "state1", lambda t: t[:4000])), r"'state1' has 4000 elements, the parameter 5000"),
    ("load-absmax-negative", _load(_edit_state(2, "absmax1", lambda t: -t)), r"'absmax1' holds negative or non-finite scales"),
    ("load-absmax-nan", _load(_edit_state(1, "absmax1", lambda t: t * float("nan"))), r"'absmax1' holds negative or non-finite"),
    ("load-map-unsorted", _load(_edit_state(1, "qmap1", _unsorted)),
     r"^state of parameter param_groups\[0\]\['params'\]\[1\] \(shape \[300\]\): qmap1\[40\] = .* > qmap1\[41\]"),
    ("load-map-dtype", _load(_edit_state(1, "qmap1", lambda t: t.to(torch.int32))), r"'qmap1' must be a floating-point tensor, got a int32"),
    ("load-step-string", _load(_edit_state(0, "step", lambda t: "2")), r"'step' must be a number or a one-element real tensor, got a str"),
    ("load-step-shape", _load(_edit_state(0, "step", lambda t: t.repeat(3))), r"'step' must be a number or a one-element real tensor"),
    ("load-seed-float", _load(lambda sd: sd["state"][1].__setitem__("seed", torch.tensor(1.5))),
     r"'seed' must be a one-element integer tensor, got a float32 tensor"),
    ("load-extra-state", _load(lambda sd: sd["state"].__setitem__(99, dict(sd["state"][0]))),
     r"state for parameter ids \[99\], which no parameter group lists"),
    ("load-extra-group", _load(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][1], params=[99]))),
     "the state dict has 3 parameter groups, the optimizer 2"),
    ("load-group-eps-nan", _load(lambda sd: sd["param_groups"][1].__setitem__("eps", float("nan"))), r"Invalid eps: nan"),
    ("load-torch-adam", _load(_adam_state), r"parameter group 0 of the state dict has 'amsgrad': it is another optimizer's"),
    ("load-torch-sgd", _load(_foreign_group(momentum=0.9, dampening=0, nesterov=False)), r"has 'momentum': it is another"),
    ("load-bnb-rmsprop", _load(_foreign_group(betas=(0.99, 0))), r"has betas=\(0.99, 0\): it is another optimizer's state dict"),
    ("load-bnb-adam-state", _load(lambda sd: sd["state"][1].__setitem__("state2", sd["state"][1]["state1"])),
     r"'state2': it is another optimizer's state, not Adagrad's"),
]


@pytest.mark.parametrize("fault,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_optimizer_entry_point_rejects_and_changes_nothing(fault, message):
    opt, params = _trained()
    call = fault(opt, params)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        call()
    after = _snapshot(opt, params)
    for part in before:
        assert _same(before[part], after[part]), f"a failed call changed {part}"


@pytest.mark.parametrize("kwargs,message", [
    (dict(qmap=_unsorted(Q.dynamic_map())), r"^Invalid qmap: qmap\[40\] = .* > qmap\[41\] = .*; map values must be"),
    (dict(qmap=torch.linspace(0, 2, 256)), r"^Invalid qmap: qmap\[128\] is 1.00392; map values must be finite, in \[-1, 1\]"),
    (dict(qmap=torch.linspace(0, 1, 255)), r"^Invalid qmap: a tensor qmap must be floating-point with 256 values"),
    (dict(qmap=torch.arange(256)), r"^Invalid qmap: a tensor qmap must be floating-point"),
])
def test_constructor_rejects_bad_maps(kwargs, message):
    p = torch.nn.Parameter(torch.randn(5000))
    before = p.detach().clone()
    with pytest.raises(ValueError, match=message):
        A.Adagrad8bit([p], **kwargs)
    assert torch.equal(p, before)


def _functional_setup():
    w8, w32 = torch.randn(5000), torch.randn(300)
    states = [F.init_state(w8, optim_bits=8), F.init_state(w32)]
    F.adagrad([w8, w32], [torch.randn(5000), torch.randn(300)], states, lr=0.1)
    return [w8, w32], [torch.randn(5000), torch.randn(300)], states


FUNCTIONAL_CASES = [  # (id, edit of (params, grads, states), message); more in tests/test_compile.py
    ("grad-aliases-param", lambda ps, gs, sts: gs.__setitem__(1, ps[1]), r"^params\[1\] and grads\[1\] overlap in memory"),
    ("state-aliases-grad", lambda ps, gs, sts: sts[1].__setitem__("sum", gs[1]), r"^grads\[1\] and state_sums\[1\] overlap"),
    ("map-unsorted", lambda ps, gs, sts: sts[0]["qmap1"].copy_(_unsorted(sts[0]["qmap1"])),
     r"^qmap\[40\] = .* > qmap\[41\]"),
    ("step-shared", lambda ps, gs, sts: sts[1].__setitem__("step", sts[0]["step"]),
     r"^states\[0\]\['step'\] and states\[1\]\['step'\] overlap in memory"),
    ("param-inside-other-call", lambda ps, gs, sts: sts[1].__setitem__("sum", ps[0][:300]),
     r"^params\[0\] and states\[1\]\['sum'\] overlap in memory"),
    ("states-length", lambda ps, gs, sts: sts.pop(), r"^params, grads and states have 2, 2 and 1 entries"),
    ("state-without-accumulator", lambda ps, gs, sts: sts[1].pop("sum"), r"^states\[1\] has neither 'sum'"),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in FUNCTIONAL_CASES], ids=[c[0] for c in FUNCTIONAL_CASES])
def test_functional_rejects_and_changes_nothing(edit, message):
    params, grads, states = _functional_setup()
    default = F.default_map(torch.device("cpu"))
    saved_default = default.clone()
    try:
        edit(params, grads, states)
        before = copy.deepcopy((params, grads, states))
        with pytest.raises(ValueError, match=message):
            F.adagrad(params, grads, states, lr=0.1)
        assert _same(before, (params, grads, states))
    finally:
        default.copy_(saved_default)  # map-unsorted edits the shared default map in place


@pytest.mark.parametrize("qmap,message", [
    (_unsorted(Q.tapered_map()), r"^qmap\[40\] = .* > qmap\[41\] = .*; map values must be finite, in \[-1, 1\] and sorted$"),
    (Q.tapered_map()[:200], r"^qmap must be a floating-point tensor of 256 values, got float32 with 200 values$"),
    (Q.tapered_map().double(), r"^qmap must be a contiguous float32 tensor on the parameter's device \(cpu\), got float64"),
    ("tapered", r"^qmap must be a floating-point tensor of 256 values, got str$"),
])
def test_init_state_rejects_bad_maps(qmap, message):
    with pytest.raises(ValueError, match=message):
        F.init_state(torch.randn(5000), optim_bits=8, qmap=qmap)


@pytest.mark.parametrize("groups", [1, 2])
def test_parameters_that_share_memory_are_rejected(groups):
    """Two parameters that are overlapping views of one buffer (a flat buffer split wrongly), in
    one group or in two (two op calls)."""
    base = torch.randn(20)
    a, b = torch.nn.Parameter(base[:12]), torch.nn.Parameter(base[6:18])
    opt = A.Adagrad32bit([a, b] if groups == 1 else [{"params": [a]}, {"params": [b], "lr": 0.5}])
    a.grad, b.grad = torch.randn(12), torch.randn(12)
    before = base.clone()
    second = r"param_groups\[0\]\['params'\]\[1\]" if groups == 1 else r"param_groups\[1\]\['params'\]\[0\]"
    with pytest.raises(ValueError, match=r"^params\[0\] and params\[1\] overlap in memory; .*\(\[0\] is parameter "
                                         r"param_groups\[0\]\['params'\]\[0\] \(shape \[12\]\); \[1\] is parameter "
                                         + second):
        opt.step()
    assert torch.equal(base, before) and len(opt.state) == 0


def test_a_float64_map_is_accepted_as_its_float32_values():
    """The qmap option takes any floating-point tensor of 256 values (bitsandbytes users pass
    float32 ones; a float64 one steps exactly like its float32 copy)."""
    runs = []
    for qmap in (Q.tapered_map(), Q.tapered_map().double()):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5000))
        opt = A.Adagrad8bit([p], qmap=qmap)
        p.grad = torch.linspace(2, -3, 5000)
        opt.step()
        runs.append((p.detach().clone(), opt.state[p]["state1"].clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
