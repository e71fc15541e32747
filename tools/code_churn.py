"""How many 8-bit codes move from one Adagrad step to the next, over a simulated training run.

    python tools/code_churn.py                      # 3000 steps of 65536 elements, block-wise
    python tools/code_churn.py --steps 1000 --block 0 --stochastic

Each element has its own gradient scale (log-normal, so the sums span many decades, as across a
layer's weights), and every step draws a new gradient and a loudness shared by the whole tensor.
Printed per checkpoint step: the share of codes that moved, of codes that moved by more than one,
and of 8-element vectors with any code moved (the AVX2 encoder keeps a vector's codes without a
table lookup only where none moved; docs/performance.md). Writes code_churn.json and a plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

import torch_adagrad8  # noqa: F401  (registers the ops)
from torch_adagrad8 import qmap as Q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=1 << 16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--block", type=int, default=256, help="block size (0: tensor-wise)")
    parser.add_argument("--stochastic", action="store_true", help="stochastic rounding")
    parser.add_argument("--out", type=Path, default=Path("out/code_churn"))
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    n = args.numel // 8 * 8
    param = torch.randn(n, generator=gen)
    scale = torch.exp(torch.randn(n, generator=gen) * 1.5)
    qmap = Q.MAPS[Q.DEFAULT_MAP]()
    codes = torch.zeros(n, dtype=torch.uint8)
    absmax = torch.zeros(-(-n // args.block) if args.block else 1)
    seeds = [torch.tensor(7)] if args.stochastic else None
    checkpoints = sorted({t for t in (1, 2, 5, 10, 30, 100, 300, 1000, 3000, 10000) if t <= args.steps} | {args.steps})
    rows = []
    for t in tqdm(range(1, args.steps + 1), desc="code_churn", unit="step"):
        loud = 1 + 0.5 * torch.randn(1, generator=gen).abs()
        grad = torch.randn(n, generator=gen) * scale * loud
        before = codes.clone()
        torch.ops.adagrad8.step.quantized([param], [grad], [codes], [absmax], qmap, [torch.tensor(float(t))],
                                          torch.tensor(0.01), 0.0, 0.0, 1e-10, False, None, False, args.block, seeds)
        if t in checkpoints:
            moved = codes != before
            far = (codes.int() - before.int()).abs() > 1
            rows.append(dict(step=t, moved=moved.float().mean().item(), moved_far=far.float().mean().item(),
                             vectors_moved=moved.view(-1, 8).any(1).float().mean().item()))
    mode = ("tensor-wise" if args.block == 0 else f"blocks of {args.block}") + (", stochastic" if args.stochastic else "")
    print(f"{n} elements, {mode}; share of codes that moved in the step")
    print(f"{'step':>6} {'codes':>8} {'by > 1':>8} {'8-vectors':>10}")
    for r in rows:
        print(f"{r['step']:6d} {r['moved']:8.4f} {r['moved_far']:8.4f} {r['vectors_moved']:10.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "code_churn.json").write_text(json.dumps(dict(mode=mode, numel=n, rows=rows), indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("vectors_moved", "8-element vectors with a moved code"), ("moved", "codes moved")):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("share")
    ax.set_title(f"8-bit Adagrad codes that move per step ({mode})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "code_churn.png", dpi=120)
    print(f"\nwrote {args.out / 'code_churn.json'} and {args.out / 'code_churn.png'}")


if __name__ == "__main__":
    main()
