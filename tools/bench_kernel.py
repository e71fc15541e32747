"""The 8-bit kernel alone: ns per element of one adagrad8::step.quantized call on one fp32 tensor,
block-wise (256 by default), tensor-wise and block-wise with stochastic rounding, timed in alternation.

    python tools/bench_kernel.py                  # 1 thread, 4M elements
    python tools/bench_kernel.py --threads 2 --numel 16777216
    python tools/bench_kernel.py --numel 65536 --reps 400 --block 64   # the cost per block

The states step on with one gradient, so their nearest-rounded codes soon stay from call to call (as
they do late in training). "block-wise, moving" starts every call from the same random state instead,
so that most of its codes move (as early in training): the AVX2 encoder keeps codes that stay without
a table lookup, and pays a little where they move (docs/performance.md). (Its reset, untimed, leaves
the codes in the caches where they fit: compare it with the same case of another build.)

No optimizer class and no peers: this is the number to compare between two builds of the kernel
(run it against each, in alternation, a few times; docs/performance.md). tools/bench.py is the
benchmark with peers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

import torch_adagrad8  # noqa: F401  (registers the ops)
from torch_adagrad8 import qmap as Q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--numel", type=int, default=4 << 20)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--block", type=int, default=256, help="block size of the block-wise states")
    parser.add_argument("--warmup", type=int, default=20, help="calls of each before the timed ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n = args.numel
    param, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    qmap = Q.MAPS[Q.DEFAULT_MAP]()
    step, lr = torch.tensor(3.0), torch.tensor(0.01)
    calls, resets = {}, {}
    for name, block, seeds in (("block-wise", args.block, None), ("tensor-wise", 0, None),
                               ("stochastic", args.block, [torch.tensor(7)]),
                               ("block-wise, moving", args.block, None)):
        codes, absmax = Q.quantize(torch.rand(n, generator=gen) * 3, qmap, block)
        calls[name] = (lambda codes=codes, absmax=absmax, block=block, seeds=seeds: torch.ops.adagrad8.step.quantized(
            [param], [grad], [codes], [absmax], qmap, [step], lr, 0.0, 0.0, 1e-10, False, None, False, block, seeds))
        if name.endswith("moving"):  # back to the first state before each call (not timed)
            first = (codes.clone(), absmax.clone())
            resets[name] = lambda codes=codes, absmax=absmax, first=first: (codes.copy_(first[0]),
                                                                             absmax.copy_(first[1]))
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in tqdm(range(args.reps), desc="bench_kernel", unit="round"):
        for name, call in calls.items():
            if name in resets:
                resets[name]()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    print(f"{args.threads} thread(s), {n} fp32 elements, blocks of {args.block}, median of {args.reps}")
    for name, t in times.items():
        print(f"  {name:18s} {statistics.median(t) / n * 1e9:6.3f} ns/elem")


if __name__ == "__main__":
    main()
