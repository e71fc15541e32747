"""Step time of adagrad8's ops against torch.optim.Adagrad, peers in the same process.

    python tools/bench.py                  # 1M, 16M, 64M fp32 elements, 2 threads
    python tools/bench.py --sizes 1M --threads 1 --reps 20

Prints a table (ms per step, ns per element, ratio to torch's fused Adagrad), and writes
bench.json and bench.png into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import torch_adagrad8  # noqa: F401
from torch_adagrad8 import _ops, qmap as Q


def parse_size(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    return int(text.rstrip("KkMmGg")) * scale


def timed(step, reps: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def make_steppers(n: int):
    """name -> zero-argument function doing one step on its own fp32 tensor of n elements."""
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(n, generator=gen)
    lr = torch.tensor(0.01)
    steppers = {}

    for name, fused in (("torch.optim.Adagrad(fused=True)", True), ("torch.optim.Adagrad(foreach=False)", False)):
        p = torch.randn(n, generator=gen).requires_grad_()
        p.grad = grad
        opt = torch.optim.Adagrad([p], lr=0.01, fused=fused, foreach=None if fused else False)
        steppers[name] = opt.step

    def ours_fp32():
        p, s, step = torch.randn(n, generator=gen), torch.zeros(n), torch.tensor(0.0)

        def run():
            step.add_(1)
            _ops.step([p], [grad], [s], [step], lr)
        return run

    def ours_8bit(block_size: int, stochastic: bool):
        p, step = torch.randn(n, generator=gen), torch.tensor(0.0)
        codes = torch.zeros(n, dtype=torch.uint8)
        absmax = torch.zeros(Q.scale_count(n, block_size))
        qmap = Q.unsigned_map()
        seeds = [torch.tensor(0)] if stochastic else None

        def run():
            step.add_(1)
            _ops.step_quantized([p], [grad], [codes], [absmax], qmap, [step], lr, block_size=block_size, seeds=seeds)
        return run

    steppers["adagrad8 step (fp32 state)"] = ours_fp32()
    steppers["adagrad8 step.quantized (block 256)"] = ours_8bit(256, False)
    steppers["adagrad8 step.quantized (block 256, stochastic)"] = ours_8bit(256, True)
    steppers["adagrad8 step.quantized (tensor-wise)"] = ours_8bit(0, False)
    return steppers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1M", "16M", "64M"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    sizes = [parse_size(s) for s in args.sizes]
    with tqdm(total=len(sizes) * 6, desc="benchmark", unit="case") as bar:
        for n, label in zip(sizes, args.sizes):
            steppers = make_steppers(n)
            for name, step in steppers.items():
                bar.set_postfix_str(f"{label} {name}")
                seconds = timed(step, args.reps, args.warmup)
                rows.append({"size": label, "numel": n, "impl": name, "ms": seconds * 1e3, "ns_per_elem": seconds * 1e9 / n})
                bar.update()
            del steppers

    fused = {r["size"]: r["ns_per_elem"] for r in rows if r["impl"] == "torch.optim.Adagrad(fused=True)"}
    header = f"{'size':>5}  {'implementation':<48} {'ms/step':>9} {'ns/elem':>8} {'vs fused':>9}"
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, median of {args.reps}")
    print(header)
    print("-" * len(header))
    for r in rows:
        r["vs_fused"] = r["ns_per_elem"] / fused[r["size"]]
        print(f"{r['size']:>5}  {r['impl']:<48} {r['ms']:9.2f} {r['ns_per_elem']:8.3f} {r['vs_fused']:8.2f}x")

    meta = {"torch": torch.__version__, "threads": args.threads, "reps": args.reps,
            "capability": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d")}
    (args.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, args.out / "bench.png", meta)
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")


def plot(rows, path: Path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        values = [next(r["ns_per_elem"] for r in rows if r["size"] == s and r["impl"] == impl) for s in sizes]
        ax.bar([i + k * width for i in range(len(sizes))], values, width, label=impl)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(sizes))], [f"{s} fp32" for s in sizes])
    ax.set_ylabel("ns per element per step (lower is better)")
    ax.set_title(f"Adagrad step, {meta['threads']} CPU threads, torch {meta['torch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
