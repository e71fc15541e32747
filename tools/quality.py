"""8-bit accuracy: how far 8-bit Adagrad state takes training from 32-bit Adagrad.

    .venv/cpu/bin/python -P tools/quality.py                   # everything, about 5 minutes on 2 cores
    .venv/cpu/bin/python -P tools/quality.py --parts A B       # the two synthetic protocols only
    .venv/cpu/bin/python -P tools/quality.py --parts lm digits --seeds 0 1 2

Protocols A and B (docs/accuracy.md) step one 1M-element parameter 100 times with the same
gradients through torch.optim.Adagrad (the 32-bit reference), through every 8-bit variant and
through bitsandbytes' Adagrad8bit when installed, all in lockstep. Metrics, after every step:
param error ||p_8bit - p_32bit|| / ||p_32bit - p_0|| and the mean relative accumulator error
|s_8bit - s_32bit| / s_32bit over the elements whose s_32bit > 0.

The real tasks train from the same initial weights on the same batches with every optimizer:
a byte-level transformer language model on the Python standard library's source, and an MLP
on scikit-learn's handwritten digits (shipped inside the scikit-learn wheel). Final validation
loss and accuracy per seed; the table gives the mean over seeds and the seed-to-seed spread.

Prints tables, writes quality.json and quality_protocols.png / quality_training.png to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import torch_adagrad8 as A8
from torch_adagrad8 import qmap as Q
from torch_adagrad8.demo import (ByteTransformer, batches, fixed_batches, format_table, split, stdlib_source,
                                  trailing_mean)

try:
    import bitsandbytes as bnb
except ImportError:  # the peer is optional
    bnb = None

LR = 0.01
EPS = 1e-10


# ---- the optimizers compared -----------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    make: Callable  # (params, lr) -> optimizer


def ours(**options) -> Callable:
    return lambda params, lr: A8.Adagrad8bit(params, lr=lr, eps=EPS, **options)


def variants(training: bool) -> list[Variant]:
    """Every 8-bit option explored, with the peers. Training runs a shorter list (no block-size
    sweep), protocols the full one."""
    out = [Variant("torch.optim.Adagrad", lambda ps, lr: torch.optim.Adagrad(ps, lr=lr, eps=EPS)),
           Variant("Adagrad32bit", lambda ps, lr: A8.Adagrad32bit(ps, lr=lr, eps=EPS))] if training else []
    out += [
        Variant("Adagrad8bit (default)", ours()),
        Variant("qmap='dynamic'", ours(qmap="dynamic")),
        Variant("qmap='signed'", ours(qmap="signed")),
        Variant("stochastic_rounding", ours(stochastic_rounding=True)),
        Variant("qmap='dynamic', stochastic", ours(qmap="dynamic", stochastic_rounding=True)),
        Variant("block_wise=False", ours(block_wise=False)),
    ]
    if not training:
        out += [Variant(f"block_size={b}", ours(block_size=b)) for b in (64, 128, 2048)]
        out += [Variant("qmap='dynamic', block_size=64", ours(qmap="dynamic", block_size=64))]
        out += [Variant(f"sqrt(s) stored, {name} map (simulated)", lambda ps, lr, m=m: SqrtStateAdagrad(ps, lr, m))
                for name, m in (("dynamic", Q.unsigned_map()), ("linear", torch.linspace(0, 1, 256)))]
    if bnb is not None:
        out.append(Variant(f"bitsandbytes {bnb.__version__} Adagrad8bit",
                           lambda ps, lr: bnb.optim.Adagrad8bit(ps, lr=lr, eps=EPS)))
    return out


class SqrtStateAdagrad(torch.optim.Optimizer):
    """Exploration only: 8-bit Adagrad that stores sqrt(s) instead of s (block-wise, 256), in
    plain PyTorch with qmap.py's rounding. Storing sqrt(s) with map m rounds like storing s with
    map m**2, except that the rounding boundaries are the squares of m's midpoints."""

    def __init__(self, params, lr: float, qmap: torch.Tensor):
        super().__init__(params, {"lr": lr})
        self.qmap = qmap

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["root"] = Q.quantize(torch.zeros_like(p), self.qmap)
                s = Q.dequantize(*st["root"], self.qmap).square() + p.grad.square()
                p.sub_(group["lr"] * p.grad / (s.sqrt() + EPS))
                st["root"] = Q.quantize(s.sqrt(), self.qmap)
                st["sum"] = Q.dequantize(*st["root"], self.qmap).square()  # what the next step reads


def accumulator(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """The (only) parameter's sum of squares as float32, dequantized where the state is 8-bit."""
    state = opt.state[p]
    if "sum" in state:
        return state["sum"].float()
    if isinstance(opt, A8.Adagrad):  # dequantized with the state's own block layout
        return opt.torch_state_dict()["state"][0]["sum"]
    # bitsandbytes: block-wise 8-bit state, always in blocks of 256
    return Q.dequantize(state["state1"], state["absmax1"], state["qmap1"], 256)


# ---- protocols A and B -----------------------------------------------------------------------

def protocol_a(n: int, steps: int):
    """ALGORITHM.md §8: randn parameters (seed 1234), then fresh randn gradients from the same
    generator."""
    gen = torch.Generator().manual_seed(1234)
    p0 = torch.randn(n, generator=gen)

    def grads():
        for _ in range(steps):
            yield torch.randn(n, generator=gen)
    return p0, grads()


def protocol_b(n: int, steps: int, dim: int = 64):
    """Gradients shaped like an embedding table's: rows of `dim` (four rows share a block of
    256), per-row scales log-uniform over 1e-3..10, Student-t (3 degrees of freedom) tails, and
    Zipf row frequencies: the row of rank r is in a batch with probability min(1, 16 / (r + 1)),
    so 16 rows have a gradient every step and most rows have none in most steps."""
    rows = n // dim
    gen = torch.Generator().manual_seed(4321)
    p0 = torch.randn(rows * dim, generator=gen) * 0.1
    scale = 10 ** (torch.rand(rows, 1, generator=gen) * 4 - 3)
    rank = torch.randperm(rows, generator=gen).float()
    frequency = (16.0 / (rank + 1)).clamp(max=1.0).view(rows, 1)

    def grads():
        for _ in range(steps):
            normal = torch.randn(rows, dim, generator=gen)
            chi2 = torch.randn(3, rows, dim, generator=gen).square().sum(0)
            student_t = normal / (chi2 / 3).sqrt()
            present = torch.rand(rows, 1, generator=gen) < frequency
            yield (student_t * scale * present).reshape(-1)
    return p0, grads()


PROTOCOLS = {"A": protocol_a, "B": protocol_b}


def run_protocol(name: str, n: int, steps: int, bar: tqdm, only: Optional[set] = None) -> dict:
    """Error curves of every variant (or of those named in `only`, and bitsandbytes) against the
    32-bit reference."""
    p0, grads = PROTOCOLS[name](n, steps)
    runs = [Variant("reference", lambda ps, lr: torch.optim.Adagrad(ps, lr=lr, eps=EPS, foreach=False))]
    runs += [v for v in variants(training=False) if only is None or v.name in only or v.name.startswith("bitsandbytes")]
    params = [nn.Parameter(p0.clone()) for _ in runs]
    opts = [v.make([p], LR) for v, p in zip(runs, params)]
    curves = {v.name: {"param": [], "accumulator": []} for v in runs[1:]}
    for g in grads:
        for p, opt in zip(params, opts):
            p.grad = g.clone()
            opt.step()
        ref_p, ref_s = params[0].detach(), accumulator(opts[0], params[0])
        moved, seen = (ref_p - p0).norm(), ref_s > 0
        for v, p, opt in zip(runs[1:], params[1:], opts[1:]):
            s = accumulator(opt, p)
            curves[v.name]["param"].append(((p.detach() - ref_p).norm() / moved).item())
            curves[v.name]["accumulator"].append(((s - ref_s).abs()[seen] / ref_s[seen]).mean().item())
        bar.update()
    return curves


# ---- real training ---------------------------------------------------------------------------

class Task:
    """A model, its batches and its evaluation; subclasses define one real task."""
    steps: int
    lr: float

    def model(self, seed: int) -> nn.Module: ...
    def batches(self, seed: int): ...
    def evaluate(self, model: nn.Module) -> tuple[float, float]: ...  # (loss, accuracy)


class ByteLM(Task):
    """Byte-level causal transformer (torch_adagrad8.demo's model, 0.47 M parameters) on 2 MB of
    stdlib source, batches of 16 windows of 64 bytes."""
    name = "lm"

    def __init__(self, steps: int = 300, lr: float = 0.02):
        self.steps, self.lr = steps, lr
        self.train, val = split(stdlib_source(2.0))
        self.val = fixed_batches(val, 8, 32, 64)  # 16384 validation bytes

    def model(self, seed):
        torch.manual_seed(seed)
        return ByteTransformer(d_model=128, layers=2, heads=4, seq_len=64)

    def batches(self, seed):
        return batches(self.train, self.steps, 16, 64, seed)

    @torch.no_grad()
    def evaluate(self, model):
        losses, hits, total = [], 0, 0
        for x, y in self.val:
            logits = model(x)
            losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
            hits += (logits.argmax(-1) == y).sum().item()
            total += y.numel()
        return statistics.fmean(losses), hits / total


class Digits(Task):
    """MLP 64-256-256-10 on scikit-learn's 8x8 digits (1797 images; 360 held out), batches of 64.
    (With lr 0.05 for 600 steps it overfits: training loss 0.003, and the held-out loss, 0.045,
    then hangs on a few test images: docs/accuracy.md.)"""
    name = "digits"

    def __init__(self, steps: int = 300, lr: float = 0.02):
        from sklearn.datasets import load_digits

        self.steps, self.lr = steps, lr
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        test, train = order[:360], order[360:]
        self.x, self.y, self.x_test, self.y_test = x[train], y[train], x[test], y[test]

    def model(self, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    def batches(self, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(self.steps):
            idx = torch.randint(len(self.y), (64,), generator=gen)
            yield self.x[idx], self.y[idx]

    @torch.no_grad()
    def evaluate(self, model):
        logits = model(self.x_test)
        return F.cross_entropy(logits, self.y_test).item(), (logits.argmax(-1) == self.y_test).float().mean().item()


def train(task: Task, variant: Variant, seed: int, bar: tqdm) -> dict:
    model = task.model(seed)
    opt = variant.make(model.parameters(), task.lr)
    losses = []
    for x, y in task.batches(seed):
        out = model(x)
        loss = F.cross_entropy(out.flatten(0, -2) if out.dim() > 2 else out, y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.update()
    val_loss, accuracy = task.evaluate(model)
    return {"losses": losses, "val_loss": val_loss, "accuracy": accuracy}


# ---- report ----------------------------------------------------------------------------------

def protocol_table(curves: dict) -> str:
    peer = next((c for name, c in curves.items() if name.startswith("bitsandbytes")), None)
    rows = []
    for name, c in curves.items():
        ratio = f"{c['param'][-1] / peer['param'][-1]:.2f}x" if peer else "n/a"
        rows.append((name, f"{c['param'][-1]:.3e}", ratio, f"{c['accumulator'][-1]:.3e}"))
    return format_table(("variant", "param error", "vs bnb", "accumulator error"), rows)


def training_table(runs: dict) -> str:
    base = runs.get("Adagrad32bit")
    rows = []
    for name, per_seed in runs.items():
        loss = [r["val_loss"] for r in per_seed]
        acc = [r["accuracy"] for r in per_seed]
        mean = statistics.fmean(loss)
        spread = statistics.stdev(loss) if len(loss) > 1 else 0.0
        rel = f"{(mean / statistics.fmean(r['val_loss'] for r in base) - 1) * 100:+.2f}%" if base else "n/a"
        train_loss = statistics.fmean(final_train_loss(r) for r in per_seed)
        rows.append((name, f"{mean:.4f}", f"{spread:.4f}", rel, f"{statistics.fmean(acc) * 100:.2f}%",
                     f"{train_loss:.4f}"))
    return format_table(("optimizer", "val loss (mean)", "seed spread (sd)", "vs Adagrad32bit", "accuracy",
                  "train loss (last 50)"), rows)


def final_train_loss(run: dict) -> float:
    return statistics.fmean(run["losses"][-50:])


def plot_protocols(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, (proto, curves) in zip(axes[0], results.items()):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # more variants than the default 10 colours
        for name, c in curves.items():
            bold = name.startswith(("Adagrad8bit", "bitsandbytes"))
            ax.plot(range(1, len(c["param"]) + 1), c["param"], linewidth=2.2 if bold else 1.0, label=name)
        ax.set(yscale="log", xlabel="step", ylabel="||p_8bit - p_32bit|| / ||p_32bit - p_0||",
               title=f"protocol {proto}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, (task, runs) in zip(axes[0], results.items()):
        for name, per_seed in runs.items():
            curve = [statistics.fmean(v) for v in zip(*(r["losses"] for r in per_seed))]
            window = 25  # trailing mean: the curves lie close together
            ax.plot(range(window + 1, len(curve) + 1), trailing_mean(curve, window)[window:], label=name, linewidth=1.2)
        ax.set(xlabel="step", ylabel="train loss (mean over seeds, 25-step mean)", title=task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["A", "B", "lm", "digits"], choices=["A", "B", "lm", "digits"])
    ap.add_argument("--size", type=int, default=1 << 20, help="protocol parameter size")
    ap.add_argument("--steps", type=int, default=100, help="protocol steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("out/quality"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    protos = [p for p in args.parts if p in PROTOCOLS]
    tasks = [t() for t in (ByteLM, Digits) if t.name in args.parts]
    train_variants = variants(training=True)
    total = len(protos) * args.steps + sum(t.steps for t in tasks) * len(args.seeds) * len(train_variants)
    start = time.perf_counter()
    results = {"protocols": {}, "training": {}}
    with tqdm(total=total, unit="step", file=sys.stderr) as bar:
        for proto in protos:
            bar.set_description(f"protocol {proto}")
            results["protocols"][proto] = run_protocol(proto, args.size, args.steps, bar)
        for task in tasks:
            runs = {}
            for v in train_variants:
                bar.set_description(f"{task.name}: {v.name}")
                runs[v.name] = [train(task, v, seed, bar) for seed in args.seeds]
            results["training"][task.name] = runs

    for proto, curves in results["protocols"].items():
        print(f"\nProtocol {proto}: {args.size} elements, {args.steps} steps, lr {LR}")
        print(protocol_table(curves))
    for task, runs in results["training"].items():
        print(f"\n{task}: validation after training, seeds {args.seeds}")
        print(training_table(runs))
    seconds = time.perf_counter() - start
    print(f"\n[quality] {seconds:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds, "torch": torch.__version__,
            "bitsandbytes": bnb.__version__ if bnb else None, "platform": platform.platform()}
    (args.out / "quality.json").write_text(json.dumps({**meta, **results}))
    written = [args.out / "quality.json"]
    if results["protocols"]:
        plot_protocols(results["protocols"], args.out / "quality_protocols.png")
        written.append(args.out / "quality_protocols.png")
    if results["training"]:
        plot_training(results["training"], args.out / "quality_training.png")
        written.append(args.out / "quality_training.png")
    print("[quality] wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
