"""Eager step vs torch.compile'd step, and compile time, for two parameter lists, peers in the same
process: our Adagrad32bit / Adagrad8bit and torch.optim.Adagrad (eager fused, and compiled).

    python tools/bench_compile.py                 # 2 threads
    python tools/bench_compile.py --reps 50 --threads 1

Models: "32 params" (16 weights of 1M elements and 16 of 1K: large tensors, time is bandwidth) and
"200 params" (100 of 16K and 100 of 256: small tensors, time is per-tensor overhead). Prints a
table and writes bench_compile.json and bench_compile.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

# Compile times are cold: inductor's caches start empty (set before torch reads it).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_compile_"))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import torch_adagrad8 as A  # noqa: E402
from bench import interleaved  # noqa: E402  (tools/bench.py, beside this script)

MODELS = {
    "32 params": [1 << 20] * 16 + [1 << 10] * 16,
    "200 params": [16 << 10] * 100 + [256] * 100,
}
OPTIMIZERS = {
    "adagrad8 Adagrad32bit": lambda ps: A.Adagrad32bit(ps, lr=0.01),
    "adagrad8 Adagrad8bit": lambda ps: A.Adagrad8bit(ps, lr=0.01),
    "torch Adagrad(fused=True)": lambda ps: torch.optim.Adagrad(ps, lr=0.01, fused=True),
    "torch Adagrad(foreach=True)": lambda ps: torch.optim.Adagrad(ps, lr=0.01, foreach=True),
}
COMPILED = ("adagrad8 Adagrad32bit", "adagrad8 Adagrad8bit", "torch Adagrad(foreach=True)")  # torch's fused does not compile


def make_params(sizes: list[int]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def measure(model: str, name: str, reps: int, warmup: int) -> list[dict]:
    """Eager and (for COMPILED) compiled steps of one optimizer on one model, each on its own copy."""
    steps, compile_s = {}, None
    for mode in ("eager", "compiled") if name in COMPILED else ("eager",):
        opt = OPTIMIZERS[name](make_params(MODELS[model]))
        opt.step()  # state exists: the compiled graph is the steady-state step
        steps[mode] = opt.step
        if mode == "compiled":
            torch._dynamo.reset()
            # torch.optim's step has a deliberate graph break (Optimizer._use_grad): no fullgraph there.
            steps[mode] = torch.compile(opt.step, fullgraph=name.startswith("adagrad8"))
            start = time.perf_counter()
            steps[mode]()
            compile_s = time.perf_counter() - start
    seconds = interleaved(steps, reps, warmup)
    return [dict(model=model, optimizer=name, mode=mode, ms=s * 1e3, compile_s=compile_s if mode == "compiled" else None)
            for mode, s in seconds.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("out/bench_compile"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    jobs = [(m, o) for m in MODELS for o in OPTIMIZERS]
    rows = [row for m, o in tqdm(jobs, desc="bench_compile", unit="case") for row in measure(m, o, args.reps, args.warmup)]

    eager = {(r["model"], r["optimizer"]): r["ms"] for r in rows if r["mode"] == "eager"}
    print(f"\ntorch {torch.__version__}, {args.threads} threads, median of {args.reps} steps, eager and "
          "compiled timed in alternation\n")
    print(f"{'model':<11} {'optimizer':<28} {'mode':<9} {'ms/step':>9} {'vs eager':>9} {'compile s':>10}")
    for r in rows:
        r["vs_eager"] = r["ms"] / eager[(r["model"], r["optimizer"])]
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
        print(f"{r['model']:<11} {r['optimizer']:<28} {r['mode']:<9} {r['ms']:>9.3f} {r['vs_eager']:>8.2f}x "
              f"{compile_s:>10}")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=args.threads, reps=args.reps, machine=platform.machine(),
                processor=platform.processor())
    (args.out / "bench_compile.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    plot(rows, args.out / "bench_compile.png", meta)
    print(f"\nwrote {args.out / 'bench_compile.json'} and {args.out / 'bench_compile.png'}")


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(6 * len(MODELS), 4.5))
    for ax, model in zip(axes, MODELS):
        mine = [r for r in rows if r["model"] == model]
        short = {"adagrad8 ": "", "torch Adagrad(": "torch ", "=True)": ""}
        labels = []
        for r in mine:
            name = r["optimizer"]
            for old, new in short.items():
                name = name.replace(old, new)
            labels.append(f"{name}\n{r['mode']}")
        colors = ["tab:blue" if r["mode"] == "eager" else "tab:orange" for r in mine]
        ax.bar(range(len(mine)), [r["ms"] for r in mine], color=colors)
        ax.set_xticks(range(len(mine)), labels, fontsize=8, rotation=30, ha="right")
        ax.set_ylabel("ms per step (lower is better)")
        ax.set_title(f"{model} ({sum(MODELS[model]) / 1e6:.1f}M elements)")
    fig.suptitle(f"Eager vs compiled optimizer step, torch {meta['torch']}, {meta['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
