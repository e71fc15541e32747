"""CPU kernels against reference.py (bit for bit) and against torch.optim.Adagrad."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import DTYPES, KINDS, OPTIONS, SIZES, Case, assert_same, make_case, reference_impl
from torch_adagrad8 import _ops, qmap as Q, reference


def check_against_reference(case):
    ref = case.clone().run(reference_impl(case.kind))
    native = case.clone().run()
    assert_same(native, ref)
    return native


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(sizes, dtype, kind):
    check_against_reference(make_case(sizes, dtype, kind, seed=len(str(sizes))))



@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_options_match_reference(options, dtype, kind):
    check_against_reference(make_case([(4099,), (31,)], dtype, kind, **options))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("block_size", [1, 7, 64, 256, 2048, 40_000, 0])
def test_block_sizes_and_rounding(block_size, stochastic, signed):
    # 40_000 and 0 (tensor-wise) take the kernel's split-block path for the 100_003-element tensor.
    kind = "tensorwise" if block_size == 0 else "blockwise"
    case = make_case([(100_003,), (513,)], torch.float32, kind, block_size=block_size or 256,
                     stochastic=stochastic, signed=signed, weight_decay=0.01)
    check_against_reference(case)


def test_many_steps_stay_identical():
    """50 chained steps: the 8-bit state re-encoded each step never drifts from the reference."""
    for kind, stochastic in (("fp32", False), ("blockwise", False), ("blockwise", True), ("tensorwise", False)):
        native = make_case([(5000,), (300,)], torch.bfloat16, kind, stochastic=stochastic, lr_decay=0.01)
        ref = native.clone()
        for t in range(50):
            gen = torch.Generator().manual_seed(t)
            fresh = [torch.randn(g.shape, generator=gen).to(g.dtype) for g in native.args[1]]
            for case in (native, ref):
                for g, f in zip(case.args[1], fresh):
                    g.copy_(f)
                for s in case.args[3 if kind == "fp32" else 5]:
                    s.add_(1)
            native.run()
            ref.run(reference_impl(kind))
        assert_same(native, ref)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("kind, block_size", [("blockwise", 256), ("blockwise", 100), ("tensorwise", 0)])
def test_steps_that_keep_their_codes_stay_identical(kind, block_size, signed, stochastic):
    """Later in training nearly every nearest-rounded code stays from one step to the next, and the
    AVX2 encoder keeps such codes without looking them up (Codebook::ranges); a stochastic code then
    lies next to its new x, which the encoder rounds between the old code's neighbours: 40 steps with
    one gradient, a block size that is not a multiple of the vector width too, checked against the
    reference after every step, until nearly all nearest codes stay (the state that path serves;
    whether it serves the right ones at the ranges' very ends is
    test_every_rounding_edge_matches_reference's)."""
    # (weight decay with the signed maps only: the other loops are those of a step without it)
    native = make_case([(70_001,), (4099,)], torch.bfloat16, kind, block_size=block_size or 256, signed=signed,
                       weight_decay=0.01 if signed else 0.0, stochastic=stochastic)
    ref = native.clone()
    for t in range(40):
        before = [c.clone() for c in native.args[2]]
        native.run()
        ref.run(reference_impl(kind))
        assert_same(native, ref)
        for case in (native, ref):
            for s in case.args[5]:
                s.add_(1)
    kept = torch.cat([(c == b).flatten() for c, b in zip(native.args[2], before)]).float().mean()
    assert kept > (0.5 if stochastic else 0.99), kept


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("block_size", [256, 100])
def test_block_whose_largest_element_changes(block_size, signed):
    """The AVX2 step decides which codes a block keeps under the scale it predicts: the new value of
    the block's elements whose old code has the map's largest magnitude (x = 1, or -1 as well on a
    signed map), since the largest element before the step has one (predicted_scale). Where another
    element becomes the largest, or the block has no such code, the prediction is wrong, and every
    code must be encoded again under the actual scale: blocks with small gradients (most codes stay
    under the predicted scale), one where an element of a lower code overtakes, one without a top
    code, one whose top element grows far, and one of zeros (predicted and actual scale 0)."""
    qmap = Q.signed_map() if signed else Q.tapered_map()
    gen = torch.Generator().manual_seed(11)
    n_blocks, b = 5, block_size
    n = n_blocks * b
    codes = torch.randint(150, 240, (n,), generator=gen, dtype=torch.uint8)
    grads = torch.randn(n, generator=gen) * 1e-3
    top = [255, 0] if signed else [255]
    codes[4 * b:] = int((qmap == 0).nonzero()[0])  # block 4: zeros
    grads[4 * b:] = 0
    for k in range(n_blocks - 1):
        if k != 2:  # block 2 has no top code
            for m, c in enumerate(top):
                codes[k * b + 7 + 40 * m] = c
    grads[1 * b + b // 2] = 0.8                   # block 1: a lower code's element overtakes
    codes[1 * b + b // 2] = 240
    grads[3 * b + 7] = 2.0                        # block 3: the top element grows far
    case = Case("blockwise", ([torch.zeros(n)], [grads], [codes], [torch.ones(n_blocks)], qmap.contiguous(),
                              [torch.tensor(3.0)]),
                dict(lr=torch.tensor(0.01), lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
                     block_size=b, seeds=None))
    native = check_against_reference(case)
    # the cases meant: block 0's scale stays near 1, blocks 1 and 3 grow, and codes moved there
    scales = native.args[3][0]
    assert scales[0] < 1.01 and scales[1] > 1.1 and scales[3] > 4 and scales[4] == 0
    moved = native.args[2][0] != codes
    assert moved[b:2 * b].float().mean() > 0.5 and moved[:b].float().mean() < 0.1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_gradient_stays_in_its_element(kind, bad):
    """ALGORITHM.md §6: a NaN/Inf gradient ruins only its own element; block scales ignore it."""
    clean = make_case([(1000,)], torch.float32, kind, seed=5)
    dirty = clean.clone()
    dirty.args[1][0][300] = bad
    check_against_reference(dirty)
    clean.run()
    dirty.run()
    others = torch.arange(1000) != 300
    assert torch.isfinite(dirty.args[0][0][others]).all()
    # Every other element, its state and (8-bit) every scale equal the run with a finite value
    # there: element 300's clean gradient is small, so it never sets its block's scale here.
    assert torch.equal(clean.args[0][0][others], dirty.args[0][0][others])
    assert torch.equal(clean.args[2][0][others], dirty.args[2][0][others])
    if kind != "fp32":
        assert torch.equal(clean.args[3][0], dirty.args[3][0])


# The max pass of tensor-wise state (and of blocks over 4096 elements) bounds each group of 256
# elements by its largest code and its largest gradient square, and computes exactly only groups
# whose bound reaches the maximum so far (kernels.cpp, max_range). A group skipped wrongly would
# miss the tensor's maximum: the scale, and with it every code, would differ from the reference.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("source", ["code", "grad", "param"])
def test_tensor_wise_scale_found_in_any_group(source, dtype):
    n = 2 * 32768 + 1000  # two spans (each starts its own maximum) and a ragged end
    for pos in (3, 255, 256 * 9 + 64, 256 * 40 + 130, 32768 + 256 * 3 + 200, 2 * 32768 + 700, n - 1):
        case = make_case([(n,)], dtype, "tensorwise", seed=pos, gnorm=True, maximize=source == "param",
                         weight_decay=0.5 if source == "param" else 0.0)
        params, grads, codes = case.args[0][0], case.args[1][0], case.args[2][0]
        codes.clamp_(max=200)
        grads.mul_(0.01)
        params.mul_(0.01)
        if source == "code":  # the largest old accumulator, with a small gradient
            codes[pos] = 255
        elif source == "grad":
            grads[pos] = 30.0
        else:  # through weight decay: g + 0.5 * param
            params[pos] = 100.0
        native = check_against_reference(case)
        new_codes = native.args[2][0]
        assert new_codes[pos] == 255 and (new_codes == 255).sum() == 1  # pos set the scale


@pytest.mark.parametrize("old_scale", [-2.0, float("nan"), float("inf"), 0.0])
def test_tensor_wise_unusual_old_scale_matches_reference(old_scale):
    """The max pass's bound needs a finite old scale >= 0; other values take the exact pass. Under
    -2 the largest |new accumulator| is at the largest code, in a later group than the first."""
    case = make_case([(40_000,)], torch.float32, "tensorwise", seed=2)
    codes = case.args[2][0]
    codes.clamp_(max=200)
    codes[:256].clamp_(max=10)
    codes[5000] = 255
    case.args[1][0].mul_(0.01)
    case.args[3][0].fill_(old_scale)
    check_against_reference(case)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["blockwise", "tensorwise"])
def test_non_finite_gradient_where_the_block_max_would_be(kind, bad):
    """ALGORITHM.md §6, the other case: the element's finite gradient would set its block's scale,
    so the scales differ. Other blocks stay bit-identical; block-mates stay finite and each is
    within half a map gap (at its block's scale) of the exact new accumulator in both runs."""
    clean = make_case([(1000,)], torch.float32, kind, seed=5)
    clean.args[1][0][300] = 1e3  # g*g = 1e6: far above every other new accumulator
    dirty = clean.clone()
    dirty.args[1][0][300] = bad
    codes, absmax, qmap = clean.args[2][0], clean.args[3][0], clean.args[4]
    block = clean.kwargs["block_size"]
    exact = Q.dequantize(codes, absmax, qmap, block) + clean.args[1][0].float().square()  # new sums
    check_against_reference(dirty)
    clean.run()
    dirty.run()
    mates = torch.zeros(1000, dtype=torch.bool)
    mates[(256 if block else 0):(512 if block else 1000)] = True
    mates[300] = False
    others = ~mates
    others[300] = False
    assert torch.isfinite(dirty.args[0][0][mates | others]).all()
    if block:  # elements and scales of the other blocks: the same bits
        assert torch.equal(clean.args[0][0][others], dirty.args[0][0][others])
        assert torch.equal(clean.args[2][0][others], dirty.args[2][0][others])
        assert torch.equal(torch.cat([clean.args[3][0][:1], clean.args[3][0][2:]]),
                           torch.cat([dirty.args[3][0][:1], dirty.args[3][0][2:]]))
    for case in (clean, dirty):
        scale = Q.per_element(case.args[3][0], 1000, block)
        got = Q.dequantize(case.args[2][0], case.args[3][0], qmap, block)
        x = (exact / scale)[mates]
        hi_i = torch.searchsorted(qmap, x).clamp(max=255)
        lo_i = (hi_i - 1).clamp(min=0)
        half_gap = (qmap[hi_i] - qmap[lo_i]) / 2 * scale[mates]
        assert torch.isfinite(got[mates]).all()
        assert ((got[mates] - exact[mates]).abs() <= half_gap * (1 + 1e-5) + 1e-30).all()
    # the dirty scale is the finite max: block-mates keep a finer grid than the clean run's
    assert dirty.args[3][0][1 if block else 0] < clean.args[3][0][1 if block else 0]


@pytest.mark.parametrize("kind", KINDS)
def test_thread_count_does_not_change_results(kind):
    case = make_case([(300_001,), (70_000,), (5,)], torch.bfloat16, kind, stochastic=kind != "fp32",
                     block_size=512)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = case.clone().run()
        torch.set_num_threads(2)
        two = case.clone().run()
    finally:
        torch.set_num_threads(old)
    assert_same(one, two)


_CAPABILITY_SCRIPT = """
import sys, torch
import torch_adagrad8
cases = torch.load(sys.argv[1], weights_only=False)
for kind, args, kwargs in cases:
    op = torch.ops.adagrad8.step.default if kind == "fp32" else torch.ops.adagrad8.step.quantized
    op(*args, **kwargs)
torch.save(cases, sys.argv[2])
"""


# The CPU kernel variants and the environment that picks each (ops_cpu.cpp): the instruction set
# and, under AVX-512, the way new codes are found (register permutes or a gather). Where this CPU
# lacks AVX512-VBMI, ops_cpu.cpp falls back to AVX512 without it and the run repeats that one; the
# avx512 variants run only where the CPU has AVX-512 (runnable_variants).
KERNEL_VARIANTS = {
    "default": dict(ATEN_CPU_CAPABILITY="default"),
    "avx2": dict(ATEN_CPU_CAPABILITY="avx2"),
    "avx512": dict(ATEN_CPU_CAPABILITY="avx512", ADAGRAD8_NO_VBMI="1", ADAGRAD8_CODE_SEARCH="permute"),
    "avx512_gather": dict(ATEN_CPU_CAPABILITY="avx512", ADAGRAD8_NO_VBMI="1", ADAGRAD8_CODE_SEARCH="gather"),
    "avx512_vbmi": dict(ATEN_CPU_CAPABILITY="avx512", ADAGRAD8_CODE_SEARCH="permute"),
    "avx512_vbmi_gather": dict(ATEN_CPU_CAPABILITY="avx512", ADAGRAD8_CODE_SEARCH="gather"),
}


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def runnable_variants() -> list[str]:
    """The KERNEL_VARIANTS this CPU can run. torch takes ATEN_CPU_CAPABILITY=avx512 at its word, and
    on a CPU without AVX-512 (AMD Zen 3) its own vectorized kernels die of SIGILL."""
    # /proc/cpuinfo's names for the instruction sets CMakeLists.txt compiles each variant with
    needs = {"default": set(), "avx2": {"avx2", "fma", "f16c", "bmi1", "bmi2"},
             "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}}
    flags = cpu_flags()
    return [cap for cap, env in KERNEL_VARIANTS.items() if needs[env["ATEN_CPU_CAPABILITY"]] <= flags]


def variant_env(**env):
    """This process's environment without its own kernel choices, plus env."""
    kept = {k: v for k, v in os.environ.items() if k not in ("ADAGRAD8_NO_VBMI", "ADAGRAD8_CODE_SEARCH")}
    return dict(kept, **env)


def results_by_variant(tmp_path, cases, envs: dict) -> dict:
    """cases run by the op alone in one subprocess per entry of envs (name: environment)."""
    torch.save([(c.kind, c.args, c.kwargs) for c in cases], tmp_path / "in.pt")
    results = {}
    for name, env in envs.items():
        out = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT, str(tmp_path / "in.pt"), str(out)],
                       check=True, env=variant_env(**env), cwd=tmp_path)
        results[name] = [Case(kind, args, kwargs) for kind, args, kwargs in torch.load(out, weights_only=False)]
    return results


def test_instruction_sets_give_identical_bits(tmp_path):
    """The AVX512 (with and without byte permutes, finding codes by permutes and by gathers), AVX2
    and scalar builds of the CPU kernels agree bit for bit (those this CPU can run).

    Inputs are made here and shipped to each subprocess: torch's own random generators give
    different bits under different ATEN_CPU_CAPABILITY settings.
    """
    cases = [
        make_case([(100_003,), (77,)], dtype, kind, stochastic=kind == "blockwise", skip_zeros=True, weight_decay=0.1)
        for kind in KINDS
        for dtype in DTYPES
    ] + wide_range_cases() + quotient_cases()
    caps = runnable_variants()
    if len(caps) < 2:
        pytest.skip("this CPU's flags are unknown or it has no AVX2: nothing to compare")
    results = results_by_variant(tmp_path, cases, {cap: KERNEL_VARIANTS[cap] for cap in caps})
    for cap in caps[1:]:
        for a, b in zip(results["default"], results[cap]):
            assert_same(a, b)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(lr_decay=0.02), dict(weight_decay=0.05), dict(maximize=True), dict(initial_accumulator_value=0.3),
     dict(lr_decay=0.02, weight_decay=0.05, maximize=True, initial_accumulator_value=0.3)],
    ids=str,
)
def test_fp32_state_matches_torch_adagrad(options, fused):
    """50 steps of adagrad8::step against torch.optim.Adagrad: relative error <= 1e-6."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 33), (1000,), (7,)]
    ours = [torch.randn(s, generator=gen) for s in shapes]
    theirs = [p.clone().requires_grad_() for p in ours]
    init = options.get("initial_accumulator_value", 0.0)
    sums = [torch.full_like(p, init) for p in ours]
    steps = [torch.tensor(0.0) for _ in ours]
    lr = 0.05
    opt = torch.optim.Adagrad(theirs, lr=lr, eps=1e-10, fused=fused, foreach=False if not fused else None, **options)
    for _ in range(50):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        for s in steps:
            s.add_(1)
        _ops.step(ours, grads, sums, steps, torch.tensor(lr), options.get("lr_decay", 0.0),
                  options.get("weight_decay", 0.0), 1e-10, options.get("maximize", False))
    for p, q in zip(ours, theirs):
        delta = (q.detach() - p).norm() / q.detach().norm()
        assert delta <= 1e-6, delta
    for s, q in zip(sums, theirs):
        torch.testing.assert_close(s, opt.state[q]["sum"], rtol=1e-6, atol=0)


def test_exact_midpoints_and_map_values_in_the_kernel():
    """Values exactly on a midpoint go to the even code; values exactly on a code stay there,
    also with stochastic rounding. Map q[i] = i / 512 makes both exact: with old scale 1 and
    codes c, a gradient of 2^-5 adds 2^-10 and gives (2c + 1) / 1024 = midpoint(c), one of 2^-4
    adds 2^-8 and gives q[c + 2]; element 0 (code 0, gradient 1) keeps the new scale at 1."""
    qmap = torch.arange(256, dtype=torch.float32) / 512
    codes0 = torch.cat([torch.zeros(1), torch.arange(255)]).to(torch.uint8)
    for grad, stochastic, expected in ((2.0**-5, False, lambda c: c + (c % 2)),
                                       (2.0**-4, True, lambda c: (c + 2).clamp(max=255))):
        grads = torch.full((256,), grad)
        grads[0] = 1.0
        case = Case("tensorwise", ([torch.zeros(256)], [grads], [codes0.clone()], [torch.ones(1)], qmap,
                                   [torch.tensor(1.0)]),
                    dict(lr=torch.tensor(0.1), lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
                         block_size=0, seeds=[torch.tensor(5)] if stochastic else None))
        native = check_against_reference(case)
        assert native.args[3][0].item() == 1.0
        c = torch.arange(255)
        assert torch.equal(native.args[2][0][1:].long(), expected(c))


@pytest.mark.parametrize("stochastic", [False, True])
def test_any_sorted_map_matches_reference(stochastic):
    """Maps unlike the named ones (values crowded closer than the kernel's lookup buckets, a
    wide gap below 1) take the kernel's exact-search fallback; results still equal the reference."""
    crowded = torch.cat([torch.linspace(0, 1e-3, 128), 0.5 + torch.arange(127) * 1e-7, torch.tensor([1.0])])
    for qmap in (crowded, torch.linspace(-1, 1, 256)):
        case = make_case([(3000,), (70_000,)], torch.float32, "blockwise", stochastic=stochastic)
        args = list(case.args)
        args[4] = qmap.contiguous()
        case.args = tuple(args)
        check_against_reference(case)


def float_roots(targets, offset=None):
    """g with fl(offset + fl(g * g)) == t for each float32 target t (offset 0 if None), where one is
    found near sqrt(t - offset), and whether it was. (About half of all floats are squares of one.)"""
    base = torch.zeros_like(targets) if offset is None else offset
    g0 = (targets.double() - base.double()).clamp(min=0).sqrt().to(torch.float32)
    root = torch.zeros_like(targets)
    found = base == targets  # gradient 0
    for k in range(-6, 7):  # neighbours of the first guess
        g = g0
        for _ in range(abs(k)):
            g = torch.nextafter(g, torch.full_like(g, math.copysign(math.inf, k)))
        ok = ~found & ((base + g * g) == targets)
        root, found = torch.where(ok, g, root), found | ok
    return root, found


def reach(qmap, t, code_of=None, old_scale=1.0):
    """For float32 targets t: code c (the largest whose old value v = fl(q[c] * old_scale) is <= t, or
    code_of's) and gradient g with fl(v + fl(g * g)) == t where one is found near sqrt(t - v), and
    whether it was."""
    values = qmap * old_scale  # the kernel's dequantization, rounded as it rounds
    base = (torch.searchsorted(values, t, right=True) - 1).clamp(min=0) if code_of is None else code_of
    grad, hit = float_roots(t, values[base])
    return base.to(torch.uint8), grad, hit


def exact_sums_case(qmap, targets, stochastic, above=False, scale=1.0):
    """A block-wise case whose new accumulators are the given values in [0, 1] times the new scale,
    those that reach() can make (the values are returned as well). Old scale `scale`, so an element
    with code c and gradient g gets fl(fl(q[c] * scale) + fl(g * g)); every block's last element gets
    exactly the new scale the same way. The old code is the map value at or below the target and the
    new scale `scale`; with `above`, the old code is the map value at or above it and the new scale
    twice `scale`, so that codes whose value lies above their new x are kept or moved as well. With a
    scale of 1 the new x are the values themselves; with one that is not a power of two, the exact
    quotients of the sums by the scale fall between floats, at many places in the ulp. Each target is followed
    by 7 elements whose new x is a map value with its own code as the old one, so that every vector
    of 8 holds one target and lanes that keep their code (the AVX2 encoder keeps a vector's codes
    only where all its lanes may)."""
    t = targets.to(torch.float32).clamp(0, 1).unique()
    new_scale = torch.tensor(scale * (2.0 if above else 1.0))

    def reach_all(t):
        if not above:
            return reach(qmap, t * new_scale, old_scale=scale)
        return reach(qmap, t * new_scale, torch.searchsorted(qmap, t).clamp(max=255), old_scale=scale)

    base, grad, hit = reach_all(t)
    one_code, one_grad, one_hit = reach_all(torch.ones(1))
    assert one_hit.all()
    values = qmap[(qmap > 0) & (qmap < 1)]
    fill_code, fill_grad, fill_hit = reach_all(values)
    fill_code, fill_grad = fill_code[fill_hit][:1].expand(7), fill_grad[fill_hit][:1].expand(7)
    m = 8 * int(hit.sum())
    n_blocks = -(-m // 255)
    codes = torch.zeros(n_blocks * 255, dtype=torch.uint8)  # padding: code 0, gradient 0 (|value| <= 1)
    grads = torch.zeros(n_blocks * 255)
    codes[:m] = torch.cat([base[hit].view(-1, 1), fill_code.expand(m // 8, 7)], 1).reshape(-1)
    grads[:m] = torch.cat([grad[hit].view(-1, 1), fill_grad.expand(m // 8, 7)], 1).reshape(-1)
    codes = torch.cat([codes.view(n_blocks, 255), one_code.expand(n_blocks, 1)], 1)
    grads = torch.cat([grads.view(n_blocks, 255), one_grad.expand(n_blocks, 1)], 1)
    n = n_blocks * 256
    case = Case("blockwise", ([torch.zeros(n)], [grads.reshape(-1)], [codes.reshape(-1)],
                              [torch.full((n_blocks,), scale)],
                              qmap.contiguous(), [torch.tensor(1.0)]),
                dict(lr=torch.tensor(0.01), lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
                     block_size=256, seeds=[torch.tensor(9)] if stochastic else None))
    return case, t[hit]


def around(values, ulps=2):
    """values and their float32 neighbours up to `ulps` away on either side."""
    out, lo, hi = [values], values, values
    for _ in range(ulps):
        lo, hi = torch.nextafter(lo, torch.zeros_like(lo) - 2), torch.nextafter(hi, torch.zeros_like(hi) + 2)
        out += [lo, hi]
    return torch.cat(out)


def near_one_maps():
    """Maps whose count lines came out steep near 1: a 16-bit sum in the line wrapped before a
    check rejected such lines (one per rounding mode; found by review)."""
    def bits(b):
        return torch.tensor([b], dtype=torch.int32).view(torch.float32)
    ramp = lambda n, d: torch.tensor(0.8) * torch.arange(n).float() / d  # noqa: E731  (float32 steps)
    stochastic = torch.cat([ramp(254, 253), bits(0x3F600020), bits(0x3F6AA780)])
    nearest = torch.cat([ramp(253, 252), torch.tensor([0.833489299, 0.916518331, 0.916718364])])
    return [stochastic, nearest]


@pytest.mark.parametrize("stochastic", [False, True])
def test_every_rounding_edge_matches_reference(stochastic):
    """The CPU encoder's counts (a line per quarter binade, checked when the map is loaded, and the
    bucket table where the check fails) on the values where a count changes: every midpoint
    (nearest) or map value (stochastic) and 2 floats on either side, every quarter-binade edge
    from 2^-34 to 1 and points approaching each from below; for maps smooth, kinked (the dynamic
    maps' decades), crowded to a few floats apart, with equal values, uniform, steep near 1, starting
    above 0, and with its top value twice. Old codes at or below the values and at or above them: the
    AVX2 encoder keeps an old code whose range holds the new x (Codebook::ranges), decided from the sum
    and the scale without the division, and both ends of the ranges are here, met exactly (scale 1), by
    quotients between floats (1.3), and where the sums are subnormal and a difference to an end would
    round to 0 (1.3 * 2^-110); with stochastic rounding it rounds between the old code's neighbours
    where x lies between them, and x meets each neighbour and the code's own value."""
    edges = torch.tensor([f * 2.0**e for e in range(-34, 0) for f in (1, 1.25, 1.5, 1.75)] + [0.0, 1.0])
    approach = torch.cat([edges * (1 - 2.0**-k) for k in range(3, 17)])  # the tops of buckets, where lines end
    crowded = torch.cat([torch.linspace(0, 1e-3, 128), 0.5 + torch.arange(127) * 1e-7, torch.tensor([1.0])])
    equal = torch.cat([torch.zeros(9), torch.full((7,), 0.25), torch.linspace(0.001, 1, 240)]).sort().values
    above_zero = torch.linspace(0.1, 1, 256)  # x below its first value (stochastic: count 0, code 0 or 1)
    top_twice = torch.cat([torch.linspace(0, 1, 255), torch.ones(1)])  # x = 1: stochastic rounds 0 / 0 to 254
    for qmap in (Q.tapered_map(), Q.unsigned_map(), Q.signed_map(), crowded, equal, torch.linspace(-1, 1, 256),
                 tiny_gap_map(), *near_one_maps(), above_zero, top_twice):
        change = qmap[1:] if stochastic else (qmap[:-1] + qmap[1:]) * 0.5
        for above, scale in itertools.product((False, True), (1.0, 1.3, 1.3 * 2.0**-110)):
            targets = torch.cat([around(change), around(edges, 1), approach])
            case, reached = exact_sums_case(qmap, targets, stochastic, above, scale)
            # nearly every change point and neighbour from the smallest map value above 0 up is reached
            wanted = around(change)
            wanted = wanted[(wanted >= qmap[qmap > 0].min()) & (wanted <= 1)].unique()
            share = torch.isin(wanted, reached).float().mean()
            # (old codes above: sums 2t need a map value in [t, 2t] and a square that lands on 2t exactly)
            assert share > (0.7 if above else 0.98), (above, share)
            check_against_reference(case)


def test_map_changes_between_calls():
    """The kernel keeps the tables of the last maps it saw: calls that switch between maps differing
    in one value only (near 1, or near 0), and between rounding modes, each match the reference,
    also once more maps have come through than it keeps, and after the tensor an earlier call read
    its map from has been overwritten (a later call with the same values must not read it)."""
    base = Q.tapered_map()
    top, bottom = base.clone(), base.clone()
    top[250] = (base[249] + base[250]) / 2  # still sorted
    bottom[3] = (base[2] + base[3]) / 2
    gone = base.clone()  # overwritten after its calls
    maps = [base, top, bottom, Q.unsigned_map(), Q.signed_map(), torch.linspace(0, 1, 256)]
    sums = torch.rand(3000, generator=torch.Generator().manual_seed(1))
    sums[5::97] = base[3]  # codes near bottom[3] too
    for qmap in [base, top, base, bottom, *maps, gone, "overwrite", base.clone(), top]:
        if isinstance(qmap, str):
            gone.zero_()
            continue
        for stochastic in (False, True):
            case = make_case([(3000,)], torch.float32, "blockwise", stochastic=stochastic, seed=4)
            codes, absmax = Q.quantize(sums, qmap, 256)
            args = list(case.args)
            args[2], args[3], args[4] = [codes], [absmax], qmap
            case.args = tuple(args)
            check_against_reference(case)


def test_unknown_code_search_is_ignored_with_a_warning(tmp_path):
    """An ADAGRAD8_CODE_SEARCH other than gather or permute warns and is ignored. (Both ways of finding
    codes give the same bits, so that the CPU's own way is the one taken is not seen here.)"""
    case = make_case([(5000,)], torch.float32, "blockwise")
    torch.save([(case.kind, case.args, case.kwargs)], tmp_path / "in.pt")
    run = subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         env=variant_env(ADAGRAD8_CODE_SEARCH="fastest"), cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert "ADAGRAD8_CODE_SEARCH='fastest' is neither 'gather' nor 'permute': ignored" in run.stderr
    (kind, args, kwargs), = torch.load(tmp_path / "out.pt", weights_only=False)
    case.run()
    assert_same(Case(kind, args, kwargs), case)


def test_instruction_set_the_cpu_lacks_falls_back(tmp_path):
    """ATEN_CPU_CAPABILITY=avx512 on a CPU without AVX-512: torch believes the variable, so the op
    must check the CPU itself and run the widest kernels it has (here the op alone runs in the
    subprocess: torch's own AVX-512 kernels, which other tests use, would die of SIGILL)."""
    if "avx512" in runnable_variants():
        pytest.skip("this CPU has AVX-512: nothing to fall back from")
    cases = [make_case([(1000,), (77,)], torch.float32, kind, stochastic=kind == "blockwise") for kind in KINDS]
    results = results_by_variant(tmp_path, cases, {cap: dict(ATEN_CPU_CAPABILITY=cap) for cap in ("default", "avx512")})
    for a, b in zip(results["default"], results["avx512"]):
        assert_same(a, b)


# The tests of the code lookups' edges (map values, midpoints, bucket edges, non-finite values,
# maps changed between calls), which this process runs under the kernels the machine picks.
LOOKUP_TESTS = ["test_map_changes_between_calls", "test_every_rounding_edge_matches_reference",
                "test_steps_that_keep_their_codes_stay_identical", "test_block_whose_largest_element_changes",
                "test_any_sorted_map_matches_reference", "test_lookup_edge_lanes_match_reference",
                "test_exact_midpoints_and_map_values_in_the_kernel", "test_non_finite_gradient_stays_in_its_element",
                "test_stochastic_fraction_equal_to_u_matches_reference",
                "test_stochastic_fractions_of_tiny_values_match_reference",
                "test_map_first_loaded_under_flush_modes_matches_reference"]


@pytest.mark.parametrize("cap", list(KERNEL_VARIANTS))
def test_lookups_under_every_kernel_variant(cap):
    """The lookup tests again under each kernel variant, those this machine does not pick by itself
    too (their tables and paths differ)."""
    if cap not in runnable_variants():
        pytest.skip(f"this CPU lacks the instruction set of the {cap} kernels")
    tests = [f"{__file__}::{name}" for name in LOOKUP_TESTS]
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], check=True,
                   env=variant_env(**KERNEL_VARIANTS[cap]), cwd=os.path.dirname(__file__))


def wide_range_cases():
    """Accumulators spanning 2^-70..1 of their block's scale, exact zeros among them, under maps
    whose lookup hits every kind of bucket: the dynamic maps, one with values below 2^-30 and an
    exact interior 0, both rounding modes, so that vector lanes take every path (plain bucket,
    bucket 0, exact search) next to each other."""
    def odd_map(*small):  # small values, then 250 more up to 1
        head = torch.tensor([-1.0, -1e-3, 0.0, *small]).float()
        return torch.cat([head, torch.linspace(1e-6, 1.0, 256 - len(head))]).sort().values

    maps = (Q.unsigned_map(), Q.signed_map(), Q.tapered_map(),  # tapered: values below 2^-30 too
            odd_map(1e-12, 1e-8),  # one midpoint (5e-13) below 2^-30: bucket 0 must search
            odd_map(1e-8),  # only an exact 0 below 2^-30
            odd_map(1e-12, 3e-10, 1e-9))  # several values below 2^-30
    cases = []
    for qmap in maps:
        for stochastic in (False, True):
            case = make_case([(4096 + 37,)], torch.float32, "blockwise", stochastic=stochastic, seed=11, step=1.0)
            gen = torch.Generator().manual_seed(5)
            exponent = torch.randint(-70, 1, (4096 + 37,), generator=gen).float()
            sums = torch.rand(4096 + 37, generator=gen) * torch.exp2(exponent)
            sums[::17] = 0.0
            grads = case.args[1][0]
            grads.mul_(torch.exp2(torch.randint(-40, 1, grads.shape, generator=gen).float()))
            codes, absmax = Q.quantize(sums, qmap, 256)
            args = list(case.args)
            args[2], args[3], args[4] = [codes], [absmax], qmap.contiguous()
            case.args = tuple(args)
            cases.append(case)
    return cases


def quotient_cases():
    """Scales where dividing by a rounded reciprocal is hardest: float32 significands whose
    reciprocal's rounding error is near half an ulp (and 1.0, and all ones), times 2^k from inside the
    kernel's fast range of scales [2^-60, 2^60] to outside it; as block-wise blocks of 256 and as
    tensor-wise tensors of 4160 (which take the kernel's write pass), nearest and stochastic rounding.
    Old scales are 0, so a new accumulator is exactly fl(g * g): element 0's is the scale S; half of
    the others are within 3 ulps of fl(t * S) where a quotient 1 ulp off from t changes the code
    (nearest: t a midpoint of the map; stochastic: t = q[lo] + u * (q[lo + 1] - q[lo]) with the
    element's random number u), the rest span 2^-140..1 of S (underflowing ones, exact zeros among
    them)."""
    gen = torch.Generator().manual_seed(8)
    m = 1 + torch.randint(0, 2**23, (40_000,), generator=gen).float() / 2**23
    error = ((1 / m).double() - 1 / m.double()).abs()  # float32 1/m is correctly rounded
    significands = torch.cat([torch.tensor([1.0, 2 - 2.0**-23]), m[error.argsort(descending=True)[:200]]])
    scales = torch.cat([significands * 2.0**k for k in (-80, -61, -60, -59, -31, -1, 0, 1, 30, 59, 60, 61)])
    root, found = float_roots(scales)
    scales, root = scales[found], root[found]
    assert len(scales) > 1000, len(scales)
    cases = []
    for (kind, width, n), stochastic in itertools.product((("blockwise", 256, len(scales)), ("tensorwise", 4160, 64)),
                                                        (False, True)):
        for qmap in (Q.unsigned_map(), Q.tapered_map()):  # tapered: values below 2^-30, bucket 0 searches
            pick = torch.randperm(len(scales), generator=gen)[:n]
            scale, first = scales[pick], root[pick]
            if kind == "blockwise":
                case = make_case([(n * width,)], torch.float32, kind, stochastic=stochastic, seed=3)
            else:
                case = make_case([(width,)] * n, torch.float32, kind, stochastic=stochastic, seed=3)
            half = width // 2
            if stochastic:  # x = q[lo] + u * (q[lo + 1] - q[lo]), u the element's random number
                seeds, steps = case.kwargs["seeds"], case.args[5]
                u = torch.cat([reference.uniforms(seeds[i], steps[i], n * width // len(seeds))
                               for i in range(len(seeds))]).view(n, width)[:, 1:half + 1]
                lo = torch.randint(int((qmap < 0).sum()), 255, (n, half), generator=gen)
                near = (qmap[lo] + u * (qmap[lo + 1] - qmap[lo])) * scale[:, None]
            else:  # midpoints of the map
                mid = ((qmap[:-1] + qmap[1:]) / 2)[qmap[:-1] >= 0]
                near = mid[torch.randint(0, len(mid), (n, half), generator=gen)] * scale[:, None]
            toward = torch.where(torch.rand(n, half, generator=gen) < 0.5, math.inf, 0.0)  # up or down
            for _ in range(3):  # 0 to 3 ulps away
                step = torch.rand(n, half, generator=gen) < 0.5
                near = torch.where(step, torch.nextafter(near, toward), near)
            near_root, hit = float_roots(near)
            # where none, a plain value (not 0: with the tapered map a 0 would send its lanes to the search)
            near_root = torch.where(hit, near_root, first[:, None] * 0.75)
            spread = torch.exp2(-torch.randint(0, 141, (n, width - half - 1), generator=gen).float() / 2)
            rest = first[:, None] * 0.99 * spread * torch.rand(n, width - half - 1, generator=gen)
            rest[:, ::13] = 0.0
            grads = torch.cat([first[:, None], near_root, rest], 1)
            if kind == "blockwise":
                grads, codes, absmax = [grads.reshape(-1)], [torch.zeros(n * width, dtype=torch.uint8)], [torch.zeros(n)]
            else:
                codes = [torch.zeros(width, dtype=torch.uint8) for _ in range(n)]
                grads, absmax = list(grads), [torch.zeros(1) for _ in range(n)]
            args = list(case.args)
            args[1], args[2], args[3], args[4] = grads, codes, absmax, qmap.contiguous()
            case.args = tuple(args)
            cases.append(case)
    return cases


def test_scales_divided_without_the_divider_match_reference():
    """The encoder's quotients s / scale by a reciprocal and two FMA corrections (kernels.cpp's
    Quotient) are the division's bits; the new scales really are the adversarial ones."""
    for case in quotient_cases():
        native = check_against_reference(case)
        first = torch.stack([g.view(-1, 256 if case.kind == "blockwise" else g.numel())[:, 0] for g in case.args[1]])
        assert torch.equal(torch.cat(native.args[3]), (first * first).reshape(-1))


def test_quotient_by_reciprocal_is_the_division_where_claimed(tmp_path):
    """quant.h's quotient_by_reciprocal (compiled on its own: tools/check_quotient.cpp) equals the
    division bit for bit on its exact domain over the hardest scales, differs below it, also between
    S * 2^-60 and 2^-101 (where only the subnormal remainder is to blame, so the bound is needed), and
    stays below 2^-40 there. Quotients that small are out of reach of a test through the op: only
    stochastic rounding depends on them, for random numbers below 2^-11."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = tmp_path / "check_quotient"
    flags = ["-mfma"] if platform.machine() in ("x86_64", "AMD64") else []
    subprocess.run([os.environ.get("CXX") or shutil.which("c++") or "g++", "-O2", "-ffp-contract=off", *flags,
                    "-I", os.path.join(root, "csrc", "include"), os.path.join(root, "tools", "check_quotient.cpp"),
                    "-o", str(exe)], check=True)
    run = subprocess.run([str(exe), "4", "997"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    exact = re.search(r"exact domain: (\d+) pairs, (\d+) differ", run.stdout)
    below = re.search(r"below it: (\d+) pairs, (\d+) differ .*\((\d+) of them with s >= S", run.stdout)
    assert int(exact[1]) > 10**7 and int(exact[2]) == 0, run.stdout
    assert int(below[2]) > 0 and int(below[3]) > 0, run.stdout


_MXCSR_SOURCE = r"""
#include <xmmintrin.h>
unsigned set_mxcsr_bits(unsigned set, unsigned clear) {
  unsigned old = _mm_getcsr();
  _mm_setcsr((old & ~clear) | set);
  return old;
}
"""
FTZ, DAZ = 0x8000, 0x0040  # MXCSR's flush-to-zero and denormals-are-zero bits


@contextlib.contextmanager
def mxcsr_mode(tmp_path, bits: int):
    """Runs the block on one thread (MXCSR is per thread) with exactly `bits` of FTZ | DAZ set, through
    a small compiled helper (torch.set_flush_denormal sets both or neither)."""
    import ctypes

    src, lib = tmp_path / "mxcsr.c", tmp_path / "libmxcsr.so"
    if not lib.exists():
        src.write_text(_MXCSR_SOURCE)
        subprocess.run([os.environ.get("CC") or shutil.which("cc") or "gcc", "-shared", "-fPIC", str(src), "-o",
                        str(lib)], check=True)
    mxcsr = ctypes.CDLL(str(lib))
    mxcsr.set_mxcsr_bits.restype = ctypes.c_uint
    mxcsr.set_mxcsr_bits.argtypes = [ctypes.c_uint, ctypes.c_uint]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = mxcsr.set_mxcsr_bits(bits, FTZ | DAZ)
    try:
        yield
    finally:
        mxcsr.set_mxcsr_bits(old & (FTZ | DAZ), FTZ | DAZ)
        torch.set_num_threads(threads)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="MXCSR is x86's")
def test_flush_to_zero_alone_every_lane_matches_reference(tmp_path):
    """With MXCSR's flush-to-zero set and denormals-are-zero clear (code that writes MXCSR itself;
    torch.set_flush_denormal sets both), g * 1 turns a subnormal gradient into 0. The vector lanes
    multiply by the gradient scale even when it is 1, as the scalar tail and reference.py (given the
    scale) do: a review found that skipping the multiply made the lanes step where the tail did not.
    (reference.py without scales does not multiply at all, so in this mode it steps everywhere.)"""
    n = 37  # vectors of 16 or 8 lanes and a tail
    grads = [torch.full((n,), 1e-40)]  # subnormal
    lr, steps, qmap = torch.tensor(1e10), [torch.tensor(1.0)], Q.MAPS[Q.DEFAULT_MAP]()

    def step(ops, gnorm_scales):  # fp32 and block-wise 8-bit state
        p, s = torch.zeros(n), torch.ones(n)
        p8, codes, absmax = torch.zeros(n), torch.full((n,), 255, dtype=torch.uint8), torch.ones(1)
        ops.step([p], grads, [s], steps, lr, 0.0, 0.0, 1e-10, False, gnorm_scales)
        ops.step_quantized([p8], grads, [codes], [absmax], qmap, steps, lr, 0.0, 0.0, 1e-10, False, gnorm_scales,
                           block_size=64)
        return p, s, p8, codes, absmax

    with mxcsr_mode(tmp_path, FTZ):
        # The kernels multiply by 1 without scales too.
        expected = step(reference, [torch.tensor(1.0)])
        results = [step(_ops, [torch.tensor(1.0)]), step(_ops, None)]
    assert expected[0].eq(0).all()  # flushed: no step
    for ours in results:
        for a, b in zip(ours, expected):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (a, b)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="MXCSR is x86's")
def test_map_first_loaded_under_flush_modes_matches_reference(tmp_path):
    """The CPU kernels keep a map's tables for later calls (codebook_for), built under whatever MXCSR
    mode the first call ran in; whether stochastic rounding scales the map's gaps must not depend on
    it (a review found the first check read a subnormal value as 0 under denormals-are-zero). A map
    with a subnormal value, first used under flush-to-zero and denormals-are-zero, then normally on
    x below that value, which reach the vector fraction where the counter finds codes."""
    qmap = torch.cat([torch.tensor([0.0, 1e-40]), torch.linspace(2e-3, 1, 254)])  # in no other test
    n = 4096
    grads = torch.rand(n, generator=torch.Generator().manual_seed(7)) * 1e-20  # g * g up to 1e-40
    grads[255::256] = 1.0

    def case():
        return Case("blockwise", ([torch.zeros(n)], [grads.clone()], [torch.zeros(n, dtype=torch.uint8)],
                                  [torch.ones(n // 256)], qmap, [torch.tensor(1.0)]),
                    dict(lr=torch.tensor(0.01), lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
                         block_size=256, seeds=[torch.tensor(2)]))

    with mxcsr_mode(tmp_path, FTZ | DAZ):
        case().run()  # the map's tables are made in this mode
    check_against_reference(case())


def tiny_gap_map():
    """A sorted map with a subnormal value and two values 2^-133 apart: the CPU kernels cannot take
    its gaps scaled by 2^-24 (Codebook::scaled_gaps) and use q[lo + 1] - q[lo] as it comes."""
    tiny = torch.tensor([0.0, 1e-40, 2.0**-110, 2.0**-110 * (1 + 2.0**-23)])
    return torch.cat([tiny, torch.linspace(1e-3, 1, 252)])


def first_gap_tiny_map():
    """A map whose first gap, 0 to 2^-110 (1 + 2^-23), would not scale exactly: with the counter
    (ADAGRAD8_CODE_SEARCH=permute) x below it reaches the vector fraction, so there the kernel must
    notice (a review's example: scaled anyway, 294k of 2M such x rounded differently)."""
    return torch.cat([torch.tensor([0.0, 2.0**-110 * (1 + 2.0**-23)]), torch.linspace(1e-3, 1, 254)])


@pytest.mark.parametrize("block", [256, 2048])
def test_stochastic_fraction_equal_to_u_matches_reference(block):
    """Elements whose fraction (x - q[lo]) / (q[lo + 1] - q[lo]) equals their own random number u, or
    is the float just above it: the code goes up only in the second case. A fraction or a u off by
    one float anywhere (the scaled gaps' u * 2^24 < d / (gap * 2^-24), docs/decisions.md) changes
    these codes. Every position's u is known in advance (reference.uniforms), x is made for it and
    reached exactly as fl(q[c] + fl(g * g)) with old scale 1 (every other element is 1.0, so every
    block's new scale is 1). x from 2^-29 up (below, some maps' lanes take the exact search), except
    for first_gap_tiny_map's first gap. LOOKUP_TESTS runs it under every kernel variant."""
    n, seed, step = 64 * block, torch.tensor(3), torch.tensor(1.0)
    u = reference.uniforms(seed, step, n).float()
    gen = torch.Generator().manual_seed(block)
    first_gap = first_gap_tiny_map()
    for qmap, min_x in ((Q.tapered_map(), 2.0**-29), (Q.unsigned_map(), 2.0**-29), (tiny_gap_map(), 2.0**-29),
                        (first_gap, 0.0)):
        usable = torch.nonzero((qmap[:-1] >= 0) & (qmap[1:] > qmap[:-1])).flatten()
        if qmap is first_gap:
            usable = usable[:1]
        lo = usable[torch.randint(len(usable), (n,), generator=gen)]
        below, gap = qmap[lo], qmap[lo + 1] - qmap[lo]
        want_up = torch.rand(n, generator=gen) < 0.5  # fraction just above u, else equal to it
        target = (below.double() + u.double() * gap.double()).float()
        best = torch.zeros(n)  # the candidate x whose fraction is the one wanted, 0 where none is
        for k in range(-3, 4):
            x = target
            for _ in range(abs(k)):
                x = torch.nextafter(x, torch.full_like(x, 2.0 if k > 0 else -2.0))
            frac = (x - below) / gap  # float32, as reference.py computes it
            ok = torch.where(want_up, frac == torch.nextafter(u, torch.ones_like(u)), frac == u)
            best = torch.where(ok & (best == 0), x, best)
        codes, grads, hit = reach(qmap, best)
        hit &= best > min_x
        assert hit.sum() > n // 128, hit.sum()  # 1.5-3%: a fraction equal to u is rare where x's floats are coarse
        # The other elements get 1.0 too: an x of 0 lies in a bucket that some maps send to the exact
        # search, and the kernel then redoes its whole group of 32 one element at a time.
        one_code, one_grad, _ = reach(qmap, torch.ones(1))
        hit[block - 1::block] = False
        codes, grads = torch.where(hit, codes, one_code), torch.where(hit, grads, one_grad)
        case = Case("blockwise", ([torch.zeros(n)], [grads], [codes], [torch.ones(n // block)], qmap.contiguous(),
                                  [step.clone()]),
                    dict(lr=torch.tensor(0.01), lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
                         block_size=block, seeds=[seed]))
        native = check_against_reference(case)
        assert torch.equal((native.args[2][0] == lo + 1) & hit, want_up & hit)  # the cases were made as meant


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="MXCSR is x86's")
@pytest.mark.parametrize("bits", [0, FTZ, DAZ, FTZ | DAZ], ids=["none", "ftz", "daz", "ftz+daz"])
def test_stochastic_fractions_of_tiny_values_match_reference(tmp_path, bits):
    """Stochastic rounding's fraction (x - q[lo]) / (q[lo + 1] - q[lo]) where x, its difference and
    the fraction are tiny or subnormal, under each of MXCSR's flush modes, for maps whose gaps the
    kernel scales by 2^-24 (docs/decisions.md: "Stochastic rounding's fraction by scaled gaps") and
    one whose gaps it cannot scale. New accumulators g * g for g = 2^-e, e uniform in [0, 76), every
    block's last element 1.0; blocks of 256 (the encoder beside the update), 2048 (its own pass) and 96."""
    gen = torch.Generator().manual_seed(1)
    n = 4096
    grads = torch.exp2(-torch.rand(n, generator=gen, dtype=torch.float64) * 76).float()
    for qmap in (Q.unsigned_map(), Q.tapered_map(), tiny_gap_map(), first_gap_tiny_map()):
        for block in (256, 2048, 96):
            g = grads.clone()
            g[block - 1::block] = 1.0
            case = Case("blockwise", ([torch.zeros(n)], [g], [torch.zeros(n, dtype=torch.uint8)],
                                      [torch.ones(-(-n // block))], qmap.contiguous(), [torch.tensor(1.0)]),
                        dict(lr=torch.tensor(0.01), lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
                             block_size=block, seeds=[torch.tensor(5)]))
            with mxcsr_mode(tmp_path, bits):
                check_against_reference(case)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="MXCSR is x86's")
@pytest.mark.parametrize("bits", [FTZ, DAZ, FTZ | DAZ], ids=["ftz", "daz", "ftz+daz"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_range_checks_on_subnormal_sums_under_flush_modes(tmp_path, bits, stochastic):
    """The AVX2 encoder's range checks (KeepCodes' multiply-adds, round_tile's compares with the old
    code's neighbours) where the sums are subnormal or nearly so (scale 1.3 * 2^-110), old codes
    below and above, under each of MXCSR's flush modes: a flushed difference or a sum read as 0 must
    send the vector the long way, never keep a wrong code."""
    change_points = lambda q: q[1:] if stochastic else (q[:-1] + q[1:]) * 0.5  # noqa: E731
    for qmap in (Q.tapered_map(), Q.signed_map()):
        for above in (False, True):
            case, _ = exact_sums_case(qmap, around(change_points(qmap)), stochastic, above, 1.3 * 2.0**-110)
            with mxcsr_mode(tmp_path, bits):
                check_against_reference(case)


def test_lookup_edge_lanes_match_reference():
    for case in wide_range_cases():
        check_against_reference(case)


def test_percentile_clip_follows_section_5():
    """adagrad8::percentile_clip against plain Python: history slots, percentile and scale."""
    from torch_adagrad8 import _ops

    gen = torch.Generator().manual_seed(3)
    grad_list = [torch.randn(500, generator=gen) * (1 + (t % 7)) for t in range(1, 131)]
    vec, history = torch.full((100,), -1.0), None
    for t, g in enumerate(grad_list, start=1):
        (scale,) = _ops.percentile_clip([g], [vec], [torch.tensor(float(t))], 20)
        n2 = float((g.double() ** 2).sum())
        history = [n2] * 100 if history is None else history
        history[t % 100] = n2
        clip, current = math.sqrt(sorted(history)[20]), math.sqrt(n2)
        want = clip / current if current > clip else 1.0
        assert vec.double().tolist() == pytest.approx(history, rel=1e-5)
        assert scale.item() == pytest.approx(want, rel=1e-5)
