"""Bad input: a clear ValueError naming the argument, raised before anything is written, with
the same message from the C++ kernel (eager), the fake kernel (torch.compile) and reference.py."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import Case, assert_same, exception_messages, make_case, reference_impl


def _set(index, fn):
    """Mutator replacing positional argument `index` by fn(old)."""
    def mutate(case: Case):
        args = list(case.args)
        args[index] = fn(args[index])
        case.args = tuple(args)
    return mutate


def _item(index, i, fn):
    """Mutator replacing element i of the list argument `index` by fn(old)."""
    def mutate(case: Case):
        case.args[index][i] = fn(case.args[index][i])
    return mutate


def _alias(index, i, source):
    """Mutator making element i of the list argument `index` the tensor source(args)."""
    def mutate(case: Case):
        case.args[index][i] = source(case.args)
    return mutate


def _kw(key, value):
    def mutate(case: Case):
        case.kwargs[key] = value(case.kwargs[key]) if callable(value) else value
    return mutate


def _both(*mutators):
    def mutate(case: Case):
        for m in mutators:
            m(case)
    return mutate


def _noncontiguous(t):
    return t.repeat_interleave(2)[::2]


def _overlapping_params(params):
    """params[1] starting inside params[0]'s memory."""
    base = torch.cat([params[0], params[1]])
    return [base[:300], base[290:307]]


def _swap(i, j):
    def swap(qmap):
        q = qmap.clone()
        q[i], q[j] = qmap[j], qmap[i]
        return q
    return swap


def _put(i, v):
    def put(qmap):
        q = qmap.clone()
        q[i] = v
        return q
    return put


OVERLAP = "; a tensor the step writes must not share memory with another argument"
MAP_RULE = "; map values must be finite, in [-1, 1] and sorted"


# (id, state kind, mutator, expected message). Positions: 0 params, 1 grads, 2 state_sums | codes,
# 3 steps (fp32) | absmax (8-bit), 4 qmap, 5 steps (8-bit).
CASES = [
    ("grads-length", "fp32", _set(1, lambda l: l[:1]), "grads has 1 tensors but params has 2"),
    ("state-length", "fp32", _set(2, lambda l: l + l), "state_sums has 4 tensors but params has 2"),
    ("steps-length", "fp32", _set(3, lambda l: l[:1]), "steps has 1 tensors but params has 2"),
    ("lr-dtype", "fp32", _kw("lr", lambda t: t.double()), "lr must hold one float32 value, got float64 with 1 elements"),
    ("lr-numel", "fp32", _kw("lr", lambda t: t.repeat(2)), "lr must hold one float32 value, got float32 with 2 elements"),
    ("eps-negative", "fp32", _kw("eps", -1.0), "eps must be finite and >= 0, got -1"),
    ("weight-decay-nan", "fp32", _kw("weight_decay", float("nan")), "weight_decay must be finite and >= 0, got nan"),
    ("lr-decay-inf", "blockwise", _kw("lr_decay", float("inf")), "lr_decay must be finite and >= 0, got inf"),
    ("param-dtype", "fp32", _both(_item(0, 0, lambda t: t.double()), _item(1, 0, lambda t: t.double())),
     "params[0] has dtype float64 but must be float32, float16 or bfloat16"),
    ("params-mixed-dtypes", "fp32", _both(_item(0, 1, lambda t: t.bfloat16()), _item(1, 1, lambda t: t.bfloat16())),
     "params[1] has dtype bfloat16 but params[0] has dtype float32"),
    ("param-noncontiguous", "fp32", _item(0, 0, _noncontiguous), "params[0] must be contiguous"),
    ("grad-dtype", "fp32", _item(1, 1, lambda t: t.half()), "grads[1] has dtype float16 but must be float32"),
    ("grad-shape", "fp32", _item(1, 0, lambda t: t[:-1]), "grads[0] has shape [299] but params[0] has shape [300]"),
    ("grad-noncontiguous", "blockwise", _item(1, 0, _noncontiguous), "grads[0] must be contiguous"),
    ("state-dtype", "fp32", _item(2, 1, lambda t: t.half()), "state_sums[1] has dtype float16 but must be float32"),
    ("state-shape", "fp32", _item(2, 0, lambda t: t.view(3, 100)),
     "state_sums[0] has shape [3, 100] but params[0] has shape [300]"),
    ("step-dtype", "fp32", _item(3, 0, lambda t: t.long()), "steps[0] must hold one float32 value, got int64 with 1 elements"),
    ("gnorm-length", "fp32", _kw("gnorm_scales", [torch.tensor(1.0)]), "gnorm_scales has 1 tensors but params has 2"),
    ("gnorm-dtype", "blockwise", _kw("gnorm_scales", [torch.tensor(1.0), torch.tensor(1.0).double()]),
     "gnorm_scales[1] must hold one float32 value, got float64 with 1 elements"),
    ("codes-dtype", "blockwise", _item(2, 0, lambda t: t.to(torch.int8)), "codes[0] has dtype int8 but must be uint8"),
    ("codes-shape", "tensorwise", _item(2, 1, lambda t: t[:5]), "codes[1] has shape [5] but params[1] has shape [17]"),
    ("absmax-length", "blockwise", _set(3, lambda l: l[:1]), "absmax has 1 tensors but params has 2"),
    ("absmax-count", "blockwise", _item(3, 0, lambda t: t[:1]), "absmax[0] has 1 elements but params[0] needs 2 for block_size 256"),
    ("absmax-tensorwise-count", "tensorwise", _item(3, 0, lambda t: t.repeat(2)),
     "absmax[0] has 2 elements but params[0] needs 1 for block_size 0"),
    ("absmax-dtype", "blockwise", _item(3, 1, lambda t: t.double()), "absmax[1] must be a contiguous float32 tensor"),
    ("qmap-size", "blockwise", _set(4, lambda t: t[:255]), "qmap must be a contiguous float32 tensor of 256 elements, got float32 with 255 elements"),
    ("qmap-dtype", "tensorwise", _set(4, lambda t: t.double()), "qmap must be a contiguous float32 tensor of 256 elements, got float64 with 256 elements"),
    ("block-size", "blockwise", _kw("block_size", -1), "block_size must be >= 1, or 0 for one block per tensor, got -1"),
    ("params-overlap", "fp32", _set(0, _overlapping_params), "params[0] and params[1] overlap in memory" + OVERLAP),
    ("grad-aliases-param", "fp32", _alias(1, 0, lambda a: a[0][0]), "params[0] and grads[0] overlap in memory" + OVERLAP),
    ("grad-aliases-param-8bit", "tensorwise", _alias(1, 1, lambda a: a[0][1]),
     "params[1] and grads[1] overlap in memory" + OVERLAP),
    ("state-aliases-grad", "fp32", _alias(2, 1, lambda a: a[1][1]), "grads[1] and state_sums[1] overlap in memory" + OVERLAP),
    ("step-inside-state", "fp32", _alias(3, 0, lambda a: a[2][0][5:6]),
     "state_sums[0] and steps[0] overlap in memory" + OVERLAP),
    ("codes-inside-param", "blockwise", _alias(2, 0, lambda a: a[0][0].view(torch.uint8)[:300]),
     "params[0] and codes[0] overlap in memory" + OVERLAP),
    ("absmax-overlap", "blockwise", _alias(3, 1, lambda a: a[3][0][1:]), "absmax[0] and absmax[1] overlap in memory" + OVERLAP),
    ("map-unsorted", "blockwise", _set(4, _swap(200, 201)), "qmap[200] = 0.596205 > qmap[201] = 0.589713" + MAP_RULE),
    ("map-nan", "tensorwise", _set(4, _put(7, float("nan"))), "qmap[7] is nan" + MAP_RULE),
    ("map-above-one", "blockwise", _set(4, _put(255, 1.5)), "qmap[255] is 1.5" + MAP_RULE),
    ("seed-dtype", "blockwise", _kw("seeds", [torch.tensor(1.0), torch.tensor(2.0)]),
     "seeds[0] must hold one int64 value, got float32 with 1 elements"),
]


def _valid(kind):
    return make_case([(300,), (17,)], torch.float32, kind, gnorm=True)


def _snapshot(case):
    return [t.clone() for t in case.mutable()]


def _assert_untouched(case, before):
    for a, b in zip(case.mutable(), before):
        assert a.is_meta or torch.equal(a, b), "a failed call wrote to its inputs"


@pytest.mark.parametrize("kind,mutate,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_eager_fake_and_reference_agree(kind, mutate, message):
    case = _valid(kind)
    mutate(case)
    before = _snapshot(case)
    with pytest.raises(ValueError) as eager:
        case.run()
    assert str(eager.value) == message
    _assert_untouched(case, before)

    with pytest.raises(ValueError) as ref:
        case.run(reference_impl(kind))
    assert str(ref.value) == message
    _assert_untouched(case, before)

    # The check-only op that eager optimizer steps run first (functional._validate).
    validate = torch.ops.adagrad8.validate.default if kind == "fp32" else torch.ops.adagrad8.validate.quantized
    with pytest.raises(ValueError) as checked:
        validate(*case.args, **case.kwargs)
    assert str(checked.value) == message

    # Under torch.compile the fake kernel raises while tracing: the graph never reaches the
    # backend. Map values are the exception: a fake tensor has none, so the graph compiles and
    # the CPU kernel raises when it runs, before writing.
    traced_graphs = []
    with pytest.raises(Exception) as compiled:
        _compile_recording(lambda args, kwargs: case.overload(*args, **kwargs), traced_graphs)(case.args, case.kwargs)
    assert message in list(exception_messages(compiled.value)), str(compiled.value)
    assert len(traced_graphs) == (1 if message.endswith(MAP_RULE) else 0)
    _assert_untouched(case, before)


def _compile_recording(fn, graphs: list):
    """torch.compile(fn, fullgraph=True) with a backend that records each graph it is given (so
    a test can tell an error raised while tracing from one raised when the graph runs)."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("kind,mutate,name", [
    ("fp32", _item(1, 1, lambda t: t.to_sparse()), "grads[1]"),
    ("fp32", _item(3, 0, lambda t: t.to_sparse()), "steps[0]"),
    ("blockwise", _kw("lr", lambda t: t.to_sparse()), "lr"),
    ("blockwise", _kw("seeds", [torch.tensor(1), torch.tensor(2).to_sparse()]), "seeds[1]"),
], ids=["grad", "step", "lr", "seed"])
def test_sparse_arguments_are_named(kind, mutate, name):
    """Eager only (Dynamo does not trace sparse inputs): the C++ kernel and reference.py name them."""
    case = _valid(kind)
    mutate(case)
    before = _snapshot(case)
    for impl in (None, reference_impl(kind)):
        with pytest.raises(ValueError, match=rf"^{re.escape(name)} is sparse; only dense tensors are supported$"):
            case.run(impl)
    _assert_untouched(case, before)


def _meta(t):
    return torch.empty_like(t, device="meta")


DEVICE_CASES = [  # one argument moved to the meta device (this machine has one real device)
    ("grads", "fp32", _item(1, 1, _meta), "grads[1] is on meta but params[0] is on cpu"),
    ("state", "fp32", _item(2, 0, _meta), "state_sums[0] is on meta but params[0] is on cpu"),
    ("steps", "blockwise", _item(5, 1, _meta), "steps[1] is on meta but params[0] is on cpu"),
    ("lr", "fp32", _kw("lr", _meta), "lr is on meta but params[0] is on cpu"),
    ("qmap", "blockwise", _set(4, _meta), "qmap is on meta but params[0] is on cpu"),
    ("absmax", "tensorwise", _item(3, 1, _meta), "absmax[1] is on meta but params[0] is on cpu"),
    ("gnorm", "blockwise", _kw("gnorm_scales", lambda l: [l[0], _meta(l[1])]),
     "gnorm_scales[1] is on meta but params[0] is on cpu"),
    ("seeds", "blockwise", _kw("seeds", [torch.tensor(1), torch.tensor(2, device="meta")]),
     "seeds[1] is on meta but params[0] is on cpu"),
]


@pytest.mark.parametrize("kind,mutate,message", [c[1:] for c in DEVICE_CASES], ids=[c[0] for c in DEVICE_CASES])
def test_device_mismatch_in_the_cpu_kernel(kind, mutate, message):
    """The C++ kernel names the tensor on another device (redispatched to CPU), and so does the
    fake kernel (a meta tensor routes the call to it); nothing is written."""
    case = _valid(kind)
    mutate(case)
    before = _snapshot(case)
    with pytest.raises(ValueError) as eager:
        case.overload.redispatch(torch._C.DispatchKeySet("CPU"), *case.args, **case.kwargs)
    assert str(eager.value) == message
    if message.startswith(("grads", "steps", "lr", "gnorm", "seeds", "qmap")):  # read-only: the fake may run
        with pytest.raises(ValueError) as fake:
            case.run()
        assert str(fake.value) == message
    _assert_untouched(case, before)


@pytest.mark.parametrize("kind", ["fp32", "blockwise"])
def test_read_only_arguments_may_share_memory(kind):
    """Only tensors the step writes must not overlap: grads, steps, lr and clipping scales that
    share memory are fine, and the step equals reference.py on the same shared inputs."""
    case = make_case([(300,), (300,)], torch.float32, kind, gnorm=True)
    grad, step = case.args[1][0], case.args[-1 if kind == "fp32" else 5][0]
    case.args[1][1] = grad
    case.args[3 if kind == "fp32" else 5][1] = step
    scales = torch.tensor([0.5, 0.75])
    case.kwargs["gnorm_scales"] = list(scales.unbind())
    case.kwargs["lr"] = scales[1]
    ref, before = case.clone(), case.args[0][0].clone()
    case.run()
    ref.run(reference_impl(kind))
    assert_same(case, ref)
    assert not torch.equal(case.args[0][0], before)  # it stepped


def _clip_args():
    return [torch.randn(300), torch.randn(17)], [torch.full((100,), -1.0), torch.rand(100)], \
        [torch.tensor(3.0), torch.tensor(3.0)], 90


CLIP_CASES = [
    ("vecs-length", lambda a: (a[0], a[1][:1], a[2], a[3]), "gnorm_vecs has 1 tensors but grads has 2"),
    ("steps-length", lambda a: (a[0], a[1], a[2] + a[2], a[3]), "steps has 4 tensors but grads has 2"),
    ("percentile-100", lambda a: (*a[:3], 100), "percentile must be in [1, 99], got 100"),
    ("percentile-0", lambda a: (*a[:3], 0), "percentile must be in [1, 99], got 0"),
    ("grad-dtype", lambda a: ([a[0][0], a[0][1].double()], *a[1:]),
     "grads[1] has dtype float64 but must be float32, float16 or bfloat16"),
    ("vec-shape", lambda a: (a[0], [a[1][0], a[1][1][:99]], *a[2:]),
     "gnorm_vecs[1] must be a contiguous float32 tensor of shape [100], got float32 of shape [99]"),
    ("vec-dtype", lambda a: (a[0], [a[1][0].double(), a[1][1]], *a[2:]),
     "gnorm_vecs[0] must be a contiguous float32 tensor of shape [100], got float64 of shape [100]"),
    ("step-dtype", lambda a: (*a[:2], [a[2][0], a[2][1].long()], a[3]),
     "steps[1] must hold one float32 value, got int64 with 1 elements"),
    ("vecs-shared", lambda a: (a[0], [a[1][0], a[1][0]], *a[2:]), "gnorm_vecs[0] and gnorm_vecs[1] overlap in memory" + OVERLAP),
    ("step-inside-vec", lambda a: (*a[:2], [a[2][0], a[1][0][3:4]], a[3]), "gnorm_vecs[0] and steps[1] overlap in memory" + OVERLAP),
]


@pytest.mark.parametrize("mutate,message", [c[1:] for c in CLIP_CASES], ids=[c[0] for c in CLIP_CASES])
def test_percentile_clip_eager_and_fake_agree(mutate, message):
    args = mutate(_clip_args())
    before = [v.clone() for v in args[1]]
    op = torch.ops.adagrad8.percentile_clip.default
    with pytest.raises(ValueError) as eager:
        op(*args)
    assert str(eager.value) == message
    assert all(torch.equal(v, b) for v, b in zip(args[1], before))
    traced_graphs = []
    with pytest.raises(Exception) as traced:
        _compile_recording(lambda a: op(*a), traced_graphs)(args)
    assert message in list(exception_messages(traced.value)), str(traced.value)
    assert not traced_graphs, "the fake kernel must raise while tracing"
    assert all(torch.equal(v, b) for v, b in zip(args[1], before))


@pytest.mark.parametrize("step", [float("nan"), float("inf"), -5.0])
def test_percentile_clip_with_any_step_value_records_in_range(step):
    """Step values are not checked (reading them would sync): a NaN or infinite step records in
    slot 0 instead of indexing with NaN (out of range on a GPU); a negative one wraps like Python."""
    grads, vecs, steps, _ = _clip_args()  # vecs[1] holds a history
    steps[1].fill_(step)
    before = vecs[1].clone()
    torch.ops.adagrad8.percentile_clip.default(grads, vecs, steps, 90)
    slot = 95 if step == -5.0 else 0
    others = torch.arange(100) != slot
    assert vecs[1][slot] == torch.linalg.vector_norm(grads[1]).square()
    assert torch.equal(vecs[1][others], before[others])


def _overlap_args():
    base = torch.randn(100)
    return [base[:40], torch.randn(3)], [base[50:], base[60:70]]


OVERLAPS_CASES = [  # (id, edit of (written, read), names, message)
    ("written-read", lambda w, r: (w, r + [w[1][1:]]), [], "written[1] and read[2]" + " overlap in memory" + OVERLAP),
    ("written-written", lambda w, r: ([w[0], w[0][39:]], r), [], "written[0] and written[1] overlap in memory" + OVERLAP),
    ("named", lambda w, r: (w, [w[0][3:5]] + r), ["params[0]", "states[4]['step']", "grads[2]", "lr", "seed"],
     "params[0] and grads[2] overlap in memory" + OVERLAP),
    ("names-length", lambda w, r: (w, r), ["a", "b"],
     "names has 2 entries but there are 4 tensors; give one name per tensor (written, then read) or none"),
]


@pytest.mark.parametrize("edit,names,message", [c[1:] for c in OVERLAPS_CASES], ids=[c[0] for c in OVERLAPS_CASES])
def test_validate_overlaps_eager_and_fake_agree(edit, names, message):
    """The overlap check over a whole step (functional.check_overlaps calls it): the C++ kernel
    and, while tracing, the fake kernel raise the same text."""
    written, read = edit(*_overlap_args())
    op = torch.ops.adagrad8.validate.overlaps
    with pytest.raises(ValueError) as eager:
        op(written, read, names)
    assert str(eager.value) == message
    traced_graphs = []
    with pytest.raises(Exception) as traced:
        _compile_recording(lambda w, r: op(w, r, names), traced_graphs)(written, read)
    assert message in list(exception_messages(traced.value)), str(traced.value)
    assert not traced_graphs, "the fake kernel must raise while tracing"


def test_validate_overlaps_accepts_shared_read_only_tensors():
    written, read = _overlap_args()
    torch.ops.adagrad8.validate.overlaps(written, read + [read[0]], [])  # no error


def test_validate_overlaps_names_a_sparse_tensor():
    written, read = _overlap_args()
    with pytest.raises(ValueError, match=r"^read\[1\] is sparse; only dense tensors are supported$"):
        torch.ops.adagrad8.validate.overlaps(written, [read[0], read[1].to_sparse()], [])


@pytest.mark.parametrize("counts,message", [
    (lambda: [torch.tensor(1.0), torch.tensor(2.0, dtype=torch.float64)],
     "counts[1] must hold one float32 value, got float64 with 1 elements"),
    (lambda: [torch.tensor(1.0), torch.zeros(2)], "counts[1] must hold one float32 value, got float32 with 2 elements"),
    (lambda: [torch.tensor(1.0), torch.tensor(3.0).to_sparse()], "counts[1] is sparse; only dense tensors are supported"),
])
def test_increment_checks_every_count_before_writing(counts, message):
    """adagrad8::increment (an eager step's step counts): the CPU kernel, the kernel other devices
    run (here on meta tensors) and the fake kernel under torch.compile raise the same message, and
    no count moves."""
    cpu = counts()
    with pytest.raises(ValueError) as eager:
        torch.ops.adagrad8.increment(cpu)
    assert str(eager.value) == message and float(cpu[0]) == 1.0
    with pytest.raises(ValueError) as other:
        torch.ops.adagrad8.increment([t.to("meta") if not t.is_sparse else t for t in counts()])
    assert str(other.value) in (message, "counts[1] is on cpu but counts[0] is on meta")
    if not cpu[1].is_sparse:  # (torch.compile refuses sparse tensors itself)
        with pytest.raises(Exception) as compiled:
            _compile_recording(torch.ops.adagrad8.increment.default, [])(cpu)
        assert message in list(exception_messages(compiled.value)), str(compiled.value)
        assert float(cpu[0]) == 1.0


def test_increment_adds_one_like_add_():
    """Counts at which adding 1 rounds (2^24 and up) get add_'s result."""
    values = [0.0, 1.0, 2.0 ** 24 - 1, 2.0 ** 24, 2.0 ** 25 + 2, 1e30, float("inf"), float("nan"), -3.5]
    ours = [torch.tensor(v) for v in values]
    torch.ops.adagrad8.increment(ours)
    for t, v in zip(ours, values):
        want = torch.tensor(v).add_(1)
        assert torch.equal(t, want) or (t.isnan() and want.isnan()), v
