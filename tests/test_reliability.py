"""Reliability (issue 7): optimizers stepping concurrently in Python threads."""

from __future__ import annotations

import threading

import torch

import torch_adagrad8 as A
from test_state_dict import _state_equal

# One optimizer per thread, each on its own parameters; every state kind.
KINDS = [
    (A.Adagrad32bit, dict(weight_decay=0.01)),
    (A.Adagrad8bit, dict()),
    (A.Adagrad8bit, dict(stochastic_rounding=True, seed=5)),
    (A.Adagrad8bit, dict(block_wise=False, percentile_clipping=90)),
    (A.Adagrad8bit, dict(qmap="signed", block_size=64, lr_decay=0.01)),
]
STEPS = 25


def _setup(k: int):
    gen = torch.Generator().manual_seed(k)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (70_001, 4096, 300)]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(STEPS)]
    cls, options = KINDS[k]
    return params, grads, cls(params, lr=0.01, **options)


def _run(params, grads, opt, start: threading.Barrier | None = None):
    if start is not None:
        start.wait()
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()


def test_threads_on_disjoint_parameters_match_sequential():
    sequential = [_setup(k) for k in range(len(KINDS))]
    for run in sequential:
        _run(*run)

    threaded = [_setup(k) for k in range(len(KINDS))]
    start = threading.Barrier(len(threaded))
    errors = []

    def work(run):
        try:
            _run(*run, start)
        except BaseException as e:  # surfaced below: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(run,)) for run in threaded]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (ps, _, opt), (qs, _, qopt) in zip(sequential, threaded):
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)
            _state_equal(opt.state[p], qopt.state[q])
