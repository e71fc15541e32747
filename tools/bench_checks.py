"""What the input checks of an eager optimizer step cost, beside the step itself.

For each case: the median eager step of Adagrad32bit / Adagrad8bit, functional.plan (every
check of the step: the validate ops, one call per op call, and the whole-step overlap check),
and functional.check_overlaps alone, with its share of the step. Prints a table; writes
out/bench_checks.json.

    .venv/cpu/bin/python tools/bench_checks.py [--threads 2] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import torch_adagrad8 as A
from torch_adagrad8 import functional as F

CASES = {"200x64K": (200, 65536), "1000x256": (1000, 256)}


def median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    todo = [(case, cls) for case in CASES for cls in (A.Adagrad32bit, A.Adagrad8bit)]
    for done, (case, cls) in enumerate(todo, 1):
        print(f"[{done}/{len(todo)}] {case} {cls.__name__}", flush=True)
        count, size = CASES[case]
        params = [torch.nn.Parameter(torch.randn(size)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn(size)
        opt = cls(params, lr=0.01, min_8bit_size=0)
        opt.step()
        grads, states = [p.grad for p in params], [opt.state[p] for p in params]
        calls = F.plan(params, grads, states, lr=0.01)
        step = median_s(opt.step, args.reps)
        plan = median_s(lambda: F.plan(params, grads, states, lr=0.01), args.reps)
        overlaps = median_s(lambda: F.check_overlaps(calls), args.reps)
        rows.append(dict(case=case, optimizer=cls.__name__, step_ms=step * 1e3, plan_us=plan * 1e6,
                         overlaps_us=overlaps * 1e6, overlaps_share=overlaps / step))
    print(f"\n{'case':10} {'optimizer':13} {'step ms':>8} {'plan us':>8} {'overlaps us':>12} {'of step':>8}")
    for r in rows:
        print(f"{r['case']:10} {r['optimizer']:13} {r['step_ms']:8.2f} {r['plan_us']:8.0f} {r['overlaps_us']:12.0f} "
              f"{r['overlaps_share']:8.1%}")
    out = Path("out")
    out.mkdir(exist_ok=True)
    (out / "bench_checks.json").write_text(json.dumps(dict(threads=args.threads, torch=torch.__version__, rows=rows),
                                                      indent=1))


if __name__ == "__main__":
    main()
