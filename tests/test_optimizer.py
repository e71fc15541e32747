"""The optimizer classes: torch.optim.Adagrad's numbers, bitsandbytes' API, torch.optim's protocol."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from torch.optim.optimizer import register_optimizer_step_post_hook

import torch_adagrad8 as A
from torch_adagrad8 import _ops, functional as F, qmap as Q, reference

HYPER = [
    dict(),
    dict(lr_decay=0.01),
    dict(weight_decay=0.01),
    dict(maximize=True),
    dict(initial_accumulator_value=0.1),
    dict(lr_decay=0.01, weight_decay=0.01, maximize=True, initial_accumulator_value=0.1),
]


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.Tanh(), torch.nn.Linear(96, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 10)).to(dtype)


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)) for _ in range(n)]


def train(model, opt, data, scheduler=None):
    """Minimise cross-entropy (maximize=True optimizers ascend its negative: the same well-behaved
    problem; ascending cross-entropy itself is chaotic, and tiny rounding differences explode)."""
    sign = -1.0 if opt.param_groups[0].get("maximize") else 1.0
    for x, y in data:
        opt.zero_grad()
        loss = sign * torch.nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def max_rel(m1, m2):
    return max(rel(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("hyper", HYPER, ids=str)
def test_32bit_matches_torch_over_100_steps(hyper):
    data = batches(100)
    ours, theirs = mlp(), mlp()
    train(ours, A.Adagrad32bit(ours.parameters(), lr=0.05, **hyper), data)
    train(theirs, torch.optim.Adagrad(theirs.parameters(), lr=0.05, **hyper), data)
    assert max_rel(ours, theirs) <= 1e-6


def _two_groups(model, **kw):
    return [dict(params=list(model[0].parameters()), lr=0.03, **kw),
            dict(params=list(model[2].parameters()) + list(model[4].parameters()), weight_decay=0.02)]


@pytest.mark.parametrize("scheduler", ["StepLR", "LambdaLR", "ReduceLROnPlateau"])
def test_32bit_matches_torch_with_groups_and_scheduler(scheduler):
    data = batches(100)
    results = []
    for make in (A.Adagrad32bit, torch.optim.Adagrad):
        model = mlp()
        opt = make(_two_groups(model, lr_decay=0.01), lr=0.05)
        if scheduler == "StepLR":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
        elif scheduler == "LambdaLR":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + 0.05 * t))
        else:
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step(1.0) if scheduler == "ReduceLROnPlateau" else sched.step()  # a plateau: lr halves
        results.append((model, [g["lr"] for g in opt.param_groups]))
    (ours, lr_ours), (theirs, lr_theirs) = results
    assert lr_ours == lr_theirs and lr_ours[0] < 0.03
    assert max_rel(ours, theirs) <= 1e-6


# Measured (this MLP, 100 steps, lr 0.05): Adagrad8bit's parameters differ from
# torch.optim.Adagrad's by at most 2.6% of their norm with any of HYPER (3.9% with the dynamic
# map, the default before issue 6); 8% is the bound.
EIGHT_BIT_TOLERANCE = 0.08


@pytest.mark.parametrize("hyper", HYPER, ids=str)
def test_8bit_close_to_torch_and_equal_to_reference_stepping(hyper):
    data = batches(100)
    ours, theirs, manual = mlp(), mlp(), mlp()
    opt = A.Adagrad8bit(ours.parameters(), lr=0.05, min_8bit_size=0, **hyper)
    train(ours, opt, data)
    train(theirs, torch.optim.Adagrad(theirs.parameters(), lr=0.05, **hyper), data)
    assert max_rel(ours, theirs) <= EIGHT_BIT_TOLERANCE

    # the same steps driven by reference.py on hand-made state: bit-identical
    qmap = Q.MAPS[Q.DEFAULT_MAP]()  # the optimizer's default
    params = list(manual.parameters())
    init = hyper.get("initial_accumulator_value", 0.0)
    state = [Q.quantize(torch.full(p.shape, float(init)), qmap, 256) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    for x, y in data:
        manual.zero_grad()
        sign = -1.0 if hyper.get("maximize") else 1.0
        (sign * torch.nn.functional.cross_entropy(manual(x), y)).backward()
        with torch.no_grad():
            for s in steps:
                s.add_(1)
            reference.step_quantized([p.data for p in params], [p.grad for p in params], [c for c, _ in state],
                                     [a for _, a in state], qmap, steps, torch.tensor(0.05),
                                     float(hyper.get("lr_decay", 0.0)), float(hyper.get("weight_decay", 0.0)),
                                     1e-10, hyper.get("maximize", False))
    for p, q in zip(ours.parameters(), manual.parameters()):
        assert torch.equal(p, q)
    for p, (codes, absmax) in zip(ours.parameters(), state):
        assert torch.equal(opt.state[p]["state1"], codes) and torch.equal(opt.state[p]["absmax1"], absmax)


def test_one_op_call_per_device_dtype_and_state_kind(monkeypatch):
    model = mlp()
    model[2].to(torch.bfloat16)  # a bf16 layer in the same group
    calls = []
    for name in ("step", "step_quantized"):
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *a, _real=real, _name=name, **k: (calls.append((_name, a[0][0].dtype,
                                                                                                len(a[0]))),
                                                                                  _real(*a, **k)))
    opt = A.Adagrad8bit(model.parameters(), lr=0.05, min_8bit_size=3000)
    x, y = batches(1)[0]
    for m in model:
        if isinstance(m, torch.nn.Linear):
            m.weight.grad = torch.randn_like(m.weight)
            m.bias.grad = torch.randn_like(m.bias)
    opt.step()
    # fp32: 8-bit [32x96 weight... 96x32=3072] and 32-bit (the rest); bf16: 8-bit (96x64 weight) and 32-bit (bias)
    assert sorted(calls, key=str) == sorted([("step_quantized", torch.float32, 1), ("step", torch.float32, 3),
                                             ("step_quantized", torch.bfloat16, 1), ("step", torch.bfloat16, 1)],
                                            key=str)
    assert opt.state[model[0].weight]["state1"].dtype == torch.uint8
    assert opt.state[model[2].bias]["sum"].dtype == torch.float32  # 32-bit state is float32 for bf16 params


def test_bf16_params_with_32bit_state_match_fp32_math():
    ours = mlp(dtype=torch.bfloat16)
    opt = A.Adagrad32bit(ours.parameters(), lr=0.05)
    train(ours, opt, batches(20))
    assert all(s["sum"].dtype == torch.float32 for s in opt.state.values())
    # the reference on the same bf16 params and grads gives the same bits
    p = torch.randn(5000).bfloat16()
    g = torch.randn(5000).bfloat16()
    q, s = p.clone(), torch.zeros(5000)
    opt = A.Adagrad32bit([p], lr=0.05)
    p.grad = g
    opt.step()
    reference.step([q], [g], [s], [torch.tensor(1.0)], torch.tensor(0.05), 0.0, 0.0, 1e-10, False)
    assert torch.equal(p, q)


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    opt = A.Adagrad8bit([a, b], lr=0.1)
    a.grad = torch.ones(10)
    before = b.detach().clone()
    opt.step()
    opt.step()
    assert b not in opt.state and torch.equal(b, before)
    assert opt.state[a]["step"].item() == 2


def test_lr_as_tensor_and_add_param_group():
    a = torch.nn.Parameter(torch.ones(8))
    lr = torch.tensor(0.5)
    opt = A.Adagrad([a], lr=lr)
    a.grad = torch.ones(8)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((8,), 0.5))
    lr.fill_(0.25)
    b = torch.nn.Parameter(torch.ones(4))
    opt.add_param_group({"params": [b], "lr": 1.0, "optim_bits": 8, "min_8bit_size": 0})
    a.grad, b.grad = torch.ones(8), torch.ones(4)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((8,), 0.5 - 0.25 / 2**0.5))
    assert opt.state[b]["state1"].dtype == torch.uint8
    torch.testing.assert_close(b.detach(), torch.zeros(4))
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": -1.0})
    assert len(opt.param_groups) == 2


def test_closure_and_step_hooks():
    model = mlp()
    opt = A.Adagrad8bit(model.parameters(), lr=0.05)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    handle = register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append("global"))
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    try:
        loss = opt.step(closure)
    finally:
        handle.remove()
    assert isinstance(loss, torch.Tensor)
    assert seen[0] == "pre" and sorted(seen[1:]) == ["global", "post"]
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_complex_params_match_torch():
    torch.manual_seed(0)
    p0 = torch.randn(300, dtype=torch.complex64)
    grads = [torch.randn(300, dtype=torch.complex64) for _ in range(30)]
    ours, theirs = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    o1 = A.Adagrad32bit([ours], lr=0.05, initial_accumulator_value=0.1, weight_decay=0.01)
    o2 = torch.optim.Adagrad([theirs], lr=0.05, initial_accumulator_value=0.1, weight_decay=0.01)
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert rel(torch.view_as_real(ours.detach()), torch.view_as_real(theirs.detach())) <= 1e-6
    eight = torch.nn.Parameter(p0.clone())
    o3 = A.Adagrad8bit([eight], lr=0.05, min_8bit_size=0)
    for g in grads:
        eight.grad = g.clone()
        o3.step()
    assert o3.state[eight]["state1"].shape == (300, 2)
    assert rel(torch.view_as_real(eight.detach()), torch.view_as_real(theirs.detach())) < 0.1


def test_sparse_gradient_names_the_parameter_and_changes_nothing():
    emb = torch.nn.Embedding(50, 8, sparse=True)
    lin = torch.nn.Linear(8, 2)
    opt = A.Adagrad8bit([{"params": lin.parameters()}, {"params": emb.parameters()}], lr=0.1)
    torch.nn.functional.mse_loss(lin(emb(torch.tensor([1, 2]))), torch.zeros(2, 2)).backward()
    before = [p.detach().clone() for p in (*lin.parameters(), *emb.parameters())]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape \[50, 8\]\) has a sparse gradient"):
        opt.step()
    assert len(opt.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, (*lin.parameters(), *emb.parameters())))


def test_named_parameters_are_named_in_errors():
    model = torch.nn.Linear(3, 3)
    opt = A.Adagrad32bit(model.named_parameters())
    model.weight.grad = torch.ones(3, 3).to_sparse()
    with pytest.raises(ValueError, match="parameter 'weight'"):
        opt.step()


BAD_CONSTRUCTION = [
    (dict(lr=-1.0), "Invalid lr"),
    (dict(lr=float("nan")), "Invalid lr"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
    (dict(eps=-1e-8), "Invalid eps"),
    (dict(lr_decay=-0.5), "Invalid lr_decay"),
    (dict(initial_accumulator_value=-1.0), "Invalid initial_accumulator_value"),
    (dict(optim_bits=16), "Invalid optim_bits"),
    (dict(percentile_clipping=0), "Invalid percentile_clipping"),
    (dict(percentile_clipping=101), "Invalid percentile_clipping"),
    (dict(percentile_clipping=95.5), "Invalid percentile_clipping"),
    (dict(min_8bit_size=-1), "Invalid min_8bit_size"),
    (dict(block_size=0), "Invalid block_size"),
    (dict(qmap="linear"), "Invalid qmap"),
    (dict(max_unorm=1.0), "max_unorm=1.0 is not supported"),
    (dict(args=types.SimpleNamespace(optim_bits=4)), "Invalid optim_bits"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CONSTRUCTION, ids=[m for _, m in BAD_CONSTRUCTION])
def test_constructor_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        A.Adagrad([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_width_specific_classes_reject_the_other_width():
    with pytest.raises(ValueError, match="Adagrad8bit keeps 8-bit state"):
        A.Adagrad8bit([torch.nn.Parameter(torch.ones(3))], optim_bits=32)
    with pytest.raises(ValueError, match="Adagrad32bit keeps 32-bit state"):
        A.Adagrad32bit([torch.nn.Parameter(torch.ones(3))], optim_bits=8)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        A.Adagrad([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))])


def test_signature_is_bitsandbytes_positional_order():
    import inspect

    names = list(inspect.signature(A.Adagrad).parameters)[:11]
    assert names == ["params", "lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "optim_bits",
                     "args", "min_8bit_size", "percentile_clipping", "block_wise"]
    p = torch.nn.Parameter(torch.ones(5000))
    opt = A.Adagrad([p], 0.1, 0.0, 0.0, 0.0, 1e-10, 8, None, 100, 100, False)
    p.grad = torch.ones(5000)
    opt.step()
    assert opt.state[p]["absmax1"].numel() == 1  # block_wise=False: one scale for the tensor


def test_args_override_keywords_like_bitsandbytes():
    args = types.SimpleNamespace(optim_bits=8, min_8bit_size=0, percentile_clipping=100, block_wise=False,
                                 max_unorm=0.0, skip_zeros=True)
    p = torch.nn.Parameter(torch.randn(1000))
    opt = A.Adagrad([p], lr=0.1, optim_bits=32, block_wise=True, args=args)
    g = torch.randn(1000)
    g[:10] = 0
    p.grad = g
    before = p.detach().clone()
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8 and opt.state[p]["absmax1"].numel() == 1
    assert torch.equal(p.detach()[:10], before[:10])  # skip_zeros from args


def test_initial_accumulator_value_in_8bit_state():
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = A.Adagrad8bit([p], lr=0.1, initial_accumulator_value=0.3, min_8bit_size=0)
    p.grad = torch.zeros(1000)
    opt.step()
    s = opt.state[p]
    assert torch.equal(Q.dequantize(s["state1"], s["absmax1"], s["qmap1"]), torch.full((1000,), 0.3))


class TestGlobalOptimManager:
    def setup_method(self):
        A.GlobalOptimManager.get_instance().initialize()

    def teardown_method(self):
        A.GlobalOptimManager.get_instance().initialize()

    def _model(self):
        torch.manual_seed(0)
        return torch.nn.ModuleDict(dict(emb=torch.nn.Embedding(1000, 16), lin=torch.nn.Linear(16, 1000)))

    def _step(self, model, opt):
        x = torch.randint(0, 1000, (8,))
        opt.zero_grad()
        model["lin"](model["emb"](x)).sum().backward()
        opt.step()

    @pytest.mark.parametrize("order", ["override_first", "register_first", "no_register"])
    def test_embedding_keeps_32bit_state(self, order):
        mng = A.GlobalOptimManager.get_instance()
        model = self._model()
        if order == "register_first":
            mng.register_parameters(model.parameters())
        mng.override_config(model["emb"].weight, "optim_bits", 32)
        if order == "override_first":
            mng.register_parameters(model.parameters())
        opt = A.Adagrad8bit(model.parameters(), lr=0.01)
        self._step(model, opt)
        assert opt.state[model["emb"].weight]["sum"].dtype == torch.float32
        assert opt.state[model["lin"].weight]["state1"].dtype == torch.uint8

    def test_override_of_one_parameter_leaves_others_alone(self):
        mng = A.GlobalOptimManager.get_instance()
        model = self._model()
        shared = {"optim_bits": 32}
        mng.override_config([model["emb"].weight, model["lin"].weight], key_value_dict=shared)
        mng.override_config(model["emb"].weight, "lr", 0.5)  # bitsandbytes would change lin's dict too
        assert mng.overrides_for(model["lin"].weight) == {"optim_bits": 32}
        assert shared == {"optim_bits": 32}

    def test_module_override_and_per_parameter_lr(self):
        mng = A.GlobalOptimManager.get_instance()
        model = self._model()
        mng.register_module_override(model["emb"], "weight", {"optim_bits": 32, "lr": 0.0})
        opt = A.Adagrad8bit(model.parameters(), lr=0.01)
        before = model["emb"].weight.detach().clone()
        self._step(model, opt)
        assert "sum" in opt.state[model["emb"].weight]
        assert torch.equal(model["emb"].weight, before)  # lr 0 for this parameter only
        assert not torch.equal(model["lin"].weight.grad, torch.zeros_like(model["lin"].weight))


def test_parameters_on_two_devices_in_one_group(monkeypatch):
    """This machine has one real device; a meta parameter stands in for the second (its op call
    runs the fake kernel, which checks the arguments and writes nothing)."""
    calls = []
    real = _ops.step_quantized
    monkeypatch.setattr(_ops, "step_quantized", lambda *a, **k: (calls.append(a[0][0].device.type), real(*a, **k)))
    cpu, meta = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000, device="meta"))
    opt = A.Adagrad8bit([cpu, meta], lr=0.1)
    cpu.grad, meta.grad = torch.randn(5000), torch.randn(5000, device="meta")
    before = cpu.detach().clone()
    opt.step()
    assert sorted(calls) == ["cpu", "meta"]
    assert all(t.device.type == "meta" for t in opt.state[meta].values() if isinstance(t, torch.Tensor))
    assert not torch.equal(cpu, before) and opt.state[cpu]["step"].item() == 1


def test_config_changed_after_state_exists_is_checked_before_any_write():
    mng = A.GlobalOptimManager.get_instance()
    a, b = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    opt = A.Adagrad8bit([a, b], lr=0.1)
    a.grad, b.grad = torch.randn(5000), torch.randn(5000)
    opt.step()
    try:
        mng.override_config(b, "block_wise", False)
        before = [a.detach().clone(), b.detach().clone(), opt.state[a]["state1"].clone()]
        with pytest.raises(ValueError, match=r"\['params'\]\[1\].*8-bit state is in blocks of 256 elements, "
                                             r"which block_wise=False, block_size=256 does not give"):
            opt.step()
        assert all(torch.equal(x, y) for x, y in zip(before, [a, b, opt.state[a]["state1"]]))
        # clipping and stochastic rounding may start late: the norm history starts over, a seed is made
        mng.override_config(b, key_value_dict={"block_wise": True, "percentile_clipping": 50,
                                               "stochastic_rounding": True})
        b.grad = torch.full((5000,), 2.0)
        opt.step()
        assert torch.equal(opt.state[b]["gnorm_vec"], torch.full((100,), 4.0 * 5000))  # every slot: this step
        assert "seed" in opt.state[b] and "seed" not in opt.state[a] and "gnorm_vec" not in opt.state[a]
        mng.override_config(b, "optim_bit", 32)  # a typo is not silently ignored
        with pytest.raises(ValueError, match=r"overrides \['optim_bit'\]"):
            opt.step()
    finally:
        mng.initialize()


def test_channels_last_and_strided_params_step_like_torch():
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(conv)
    ours, theirs = A.Adagrad32bit(conv.parameters(), lr=0.1), torch.optim.Adagrad(twin.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    for _ in range(3):
        for m, o in ((conv, ours), (twin, theirs)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert max_rel(conv, twin) <= 1e-6


def test_a_failing_step_writes_nothing():
    """The op-level checks of every call run before the first write (here a 32-bit call's state
    was replaced by one of the wrong size, so that call's check fails after another call's)."""
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(3, 4))
    opt = A.Adagrad32bit([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(10), torch.ones(3, 4)
    opt.step()
    opt.state[b]["sum"] = torch.zeros(13)
    before = [a.detach().clone(), b.detach().clone(), opt.state[a]["sum"].clone(), opt.state[a]["step"].clone()]
    with pytest.raises(ValueError, match=r"state_sums\[0\] has shape \[13\] but params\[0\] has shape \[3, 4\]"):
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, [a, b, opt.state[a]["sum"], opt.state[a]["step"]]))


def test_hyperparameters_other_than_lr_must_be_numbers():
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        A.Adagrad([torch.nn.Parameter(torch.ones(3))], weight_decay=torch.tensor(-1.0))


# Inductor says it falls back to eager for the complex copy-back (a fresh cache shows it; a warm
# one skips the lowering). Expected here: complex parameters step through a real copy.
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
@pytest.mark.parametrize("make", [A.Adagrad32bit, lambda ps, **k: A.Adagrad8bit(ps, min_8bit_size=0, **k)],
                         ids=["32bit", "8bit"])
def test_complex_params_compile(make):
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300, dtype=torch.complex64))
        opt = make([p], lr=0.05)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for i in range(3):
            p.grad = torch.randn(300, dtype=torch.complex64, generator=torch.Generator().manual_seed(i))
            step()
        results.append(p.detach().clone())
    assert torch.equal(*results)


def test_loaded_state_keeps_group_extras_and_its_own_lr_tensor():
    model, twin = mlp(), mlp()
    opt = A.Adagrad8bit(model.parameters(), lr=torch.tensor(0.05))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, batches(2), sched)
    lr = torch.tensor(0.05)
    opt2 = A.Adagrad8bit(twin.parameters(), lr=lr)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] is lr and torch.equal(lr, opt.param_groups[0]["lr"])
    assert lr.item() == pytest.approx(0.0125)
    assert opt2.param_groups[0]["initial_lr"] == opt.param_groups[0]["initial_lr"]
    torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5, last_epoch=1)  # needs initial_lr


def test_clipping_history_starts_over_after_loading_a_state_without_it():
    """A torch.optim.Adagrad state has no norm history: the first step after loading fills it."""
    model, twin = mlp(), mlp()
    theirs = torch.optim.Adagrad(model.parameters(), lr=0.05)
    train(model, theirs, batches(5))
    ours = A.Adagrad32bit(twin.parameters(), lr=0.05, percentile_clipping=5)
    twin.load_state_dict(model.state_dict())
    ours.load_state_dict(theirs.state_dict())
    before = [p.detach().clone() for p in twin.parameters()]
    train(twin, ours, batches(3, seed=7))
    assert all(not torch.equal(p, q) for p, q in zip(before, twin.parameters()))  # clipped, not frozen


def test_a_failing_step_creates_no_state():
    """A parameter stepping for the first time gets no state when another call's check fails."""
    a, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(10))
    opt = A.Adagrad32bit([{"params": [a]}, {"params": [b], "percentile_clipping": 50}], lr=0.1)
    a.grad = torch.ones(3, 4)
    opt.step()
    opt.state[a]["sum"] = torch.zeros(13)
    a.grad, b.grad = torch.ones(3, 4), torch.ones(10)
    with pytest.raises(ValueError, match=r"state_sums\[0\] has shape \[13\]"):
        opt.step()
    assert b not in opt.state or not opt.state[b]
    assert set(opt.state[a]) == {"step", "sum"}


def test_a_step_under_fake_tensor_mode_leaves_later_real_steps_exact():
    """A live optimizer stepped once under FakeTensorMode (as memory estimators do) and then for
    real: the real steps equal a twin's that was never faked. The float lr's tensor, which eager
    steps keep between steps, must not carry a fake tensor into a real step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def make():
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5000, generator=gen))
        p.grad = torch.randn(5000, generator=gen)
        return p, A.Adagrad8bit([p], lr=0.1)

    (p, opt), (twin, twin_opt) = make(), make()
    opt.step(), twin_opt.step()
    opt.param_groups[0]["lr"] = twin_opt.param_groups[0]["lr"] = 0.05
    with FakeTensorMode(allow_non_fake_inputs=True):
        opt.step()
    for _ in range(2):
        opt.step(), twin_opt.step()
    assert torch.equal(p, twin)
    assert all(torch.equal(opt.state[p][k], twin_opt.state[twin][k]) for k in ("state1", "absmax1", "step"))


def test_lr_tensor_cache_reuses_a_cpu_tensor_until_the_lr_changes():
    """functional.lr_tensor's cache (the optimizers' eager steps): the same tensor while the float
    lr stays, a new one with a new lr, and nothing kept for other devices (streams could race)."""
    cpu, cache = torch.device("cpu"), {}
    first = F.lr_tensor(0.1, cpu, cache)
    assert F.lr_tensor(0.1, cpu, cache) is first
    assert torch.equal(first, torch.tensor(0.1))
    changed = F.lr_tensor(0.05, cpu, cache)
    assert changed is not first and torch.equal(changed, torch.tensor(0.05))
    assert F.lr_tensor(0.1, torch.device("meta"), cache).device.type == "meta"
    assert list(cache) == [cpu]
