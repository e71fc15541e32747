"""Train a small byte-level language model with three Adagrads and compare them.

    python -m torch_adagrad8.demo                       # defaults: < 3 minutes on 2 CPU cores
    python -m torch_adagrad8.demo --steps 1000 --d-model 256 --layers 4 --data-mb 8

The data is the Python standard library's own source (the .py files under sysconfig's
"stdlib" path, sorted, the first --data-mb MB; the last 10% is the validation set), so the demo
needs no network. The model is a tiny causal transformer over bytes. torch.optim.Adagrad,
torch_adagrad8.Adagrad32bit and torch_adagrad8.Adagrad8bit each train it from the same initial
weights on the same batches; the forward/backward and opt.step are both compiled with
torch.compile. Prints a table (losses, optimizer-state bytes, extra resident memory during
opt.step, ms per step) and writes demo.json and demo.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import torch_adagrad8

OPTIMIZERS = {
    "torch.optim.Adagrad": torch.optim.Adagrad,
    "torch_adagrad8.Adagrad32bit": torch_adagrad8.Adagrad32bit,
    "torch_adagrad8.Adagrad8bit": torch_adagrad8.Adagrad8bit,
}
WARMUP_STEPS = 5  # the compiling steps (forward/backward once, opt.step twice: before and after state exists)
MEMORY_PROBES = 5  # steps whose opt.step is measured for memory (and left out of the timing)


# ---- data ------------------------------------------------------------------------------------

def stdlib_source(megabytes: float) -> bytes:
    """The first `megabytes` MB of the standard library's .py files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    limit, chunks, size = int(megabytes * 1e6), [], 0
    for path in files:
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
        if size >= limit:
            break
    text = b"".join(chunks)[:limit]
    if len(text) < limit:
        print(f"[demo] only {len(text) / 1e6:.2f} MB of .py files under {root}")
    return text


def split(text: bytes, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def batches(data: torch.Tensor, steps: int, batch: int, seq_len: int, seed: int):
    """(inputs, next-byte targets) of random windows; the same sequence for every optimizer."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(len(data) - seq_len - 1, (batch, 1), generator=gen)
        windows = data[starts + torch.arange(seq_len + 1)]
        yield windows[:, :-1], windows[:, 1:]


def fixed_batches(data: torch.Tensor, count: int, batch: int, seq_len: int):
    """`count` batches of evenly spaced windows: a deterministic evaluation set."""
    starts = torch.linspace(0, len(data) - seq_len - 2, count * batch).long().view(count, batch, 1)
    windows = data[starts + torch.arange(seq_len + 1)]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


# ---- model -----------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class ByteTransformer(nn.Module):
    """A causal transformer over the 256 byte values."""

    def __init__(self, d_model: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.embed, self.pos = nn.Embedding(256, d_model), nn.Parameter(torch.zeros(seq_len, d_model))
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x) + self.pos[: x.shape[1]])))


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


# ---- measurements ----------------------------------------------------------------------------

def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors; a tensor shared by parameters (the 8-bit map)
    counts once."""
    seen, total = set(), 0
    for state in opt.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def extra_rss_during(fn) -> int | None:
    """Bytes the process's resident set grew to above its size before fn() (Linux: reset the
    high-water mark VmHWM through /proc/self/clear_refs, compare VmHWM after with VmRSS before).
    None where that is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return (_status_kb("VmHWM") - before) * 1024


@torch.no_grad()
def mean_loss(model: nn.Module, data: list) -> float:
    return statistics.fmean(loss_of(model, x, y).item() for x, y in data)


# ---- training --------------------------------------------------------------------------------

def train(name, opt_class, model, initial, grad_step, args, train_data, evals, bar) -> dict:
    model.load_state_dict(initial)  # in place, so the compiled forward/backward is reused
    for p in model.parameters():
        p.grad = None
    opt = opt_class(model.parameters(), lr=args.lr)
    # torch's recipe for a compiled optimizer. Ours compiles twice: the first step creates the
    # state, the second traces the steady state (torch.optim.Adagrad makes its state up front).
    opt_step = torch.compile(opt.step)
    probe_every = (args.steps - WARMUP_STEPS) // MEMORY_PROBES
    probes = set(range(WARMUP_STEPS + probe_every // 2, args.steps, probe_every))

    losses, step_ms, opt_ms, extra_rss = [], [], [], []
    for i, (x, y) in enumerate(batches(train_data, args.steps, args.batch, args.seq_len, args.seed)):
        start = time.perf_counter()
        loss = grad_step(model, x, y)
        mid = time.perf_counter()
        if i in probes:  # the memory probe's own work stays out of the timings
            extra_rss.append(extra_rss_during(opt_step))
        else:
            opt_step()
            if i >= WARMUP_STEPS:
                end = time.perf_counter()
                step_ms.append((end - start) * 1e3)
                opt_ms.append((end - mid) * 1e3)
        opt.zero_grad()
        losses.append(loss.item())
        bar.set_postfix_str(f"{name} loss {losses[-1]:.3f}")
        bar.update()

    measured = [b for b in extra_rss if b is not None]
    return {
        "train_loss": mean_loss(model, evals["train"]),
        "val_loss": mean_loss(model, evals["val"]),
        "state_bytes": state_bytes(opt),
        "peak_step_extra_rss_bytes": max(measured) if measured else None,
        "ms_per_step": statistics.median(step_ms),
        "ms_per_opt_step": statistics.median(opt_ms),
        "losses": losses,
    }


def grad_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = loss_of(model, x, y)
    loss.backward()
    return loss.detach()


# ---- report ----------------------------------------------------------------------------------

def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_table(head: tuple, rows: list[tuple]) -> str:
    """Text columns: the first left-aligned, the others right-aligned, a rule under the head."""
    rows = [head] + rows
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def table(results: dict) -> str:
    head = ("optimizer", "train loss", "val loss", "state", "peak step mem", "ms/step", "ms/opt.step")
    return format_table(head, [
        (name, f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}", human_bytes(r["state_bytes"]),
         human_bytes(r["peak_step_extra_rss_bytes"]), f"{r['ms_per_step']:.1f}", f"{r['ms_per_opt_step']:.2f}")
        for name, r in results.items()
    ])


def trailing_mean(values: list, window: int) -> list:
    """Each value replaced by the mean of it and up to window - 1 values before it."""
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    # Dashed and dotted: the two 32-bit curves coincide (same math; they differ in the last bits).
    for (name, r), style in zip(results.items(), ("-", "--", ":")):
        losses = r["losses"]
        # a trailing mean of 20 steps, so that the curves can be told apart from the noise
        (line,) = ax.plot(trailing_mean(losses, 20), style, linewidth=1.8, label=f"{name} (val {r['val_loss']:.3f})")
        ax.plot(losses, color=line.get_color(), alpha=0.15, linewidth=0.7)
    ax.set(xlabel="step", ylabel="train loss (nats per byte; mean of 20 steps)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m torch_adagrad8.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--d-model", type=int, default=128, help="transformer width")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--data-mb", type=float, default=2.0, help="MB of stdlib source to read")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    args = ap.parse_args(argv)
    if args.steps < 2 * (WARMUP_STEPS + MEMORY_PROBES):
        ap.error(f"--steps must be at least {2 * (WARMUP_STEPS + MEMORY_PROBES)} (compiling steps and memory "
                 "probes are not timed)")
    if args.d_model % args.heads:
        ap.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    torch.set_num_threads(args.threads)

    train_data, val_data = split(stdlib_source(args.data_mb))
    evals = {"train": fixed_batches(train_data, args.eval_batches, args.batch, args.seq_len),
             "val": fixed_batches(val_data, args.eval_batches, args.batch, args.seq_len)}
    torch.manual_seed(args.seed)
    model = ByteTransformer(args.d_model, args.layers, args.heads, args.seq_len)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[demo] {len(train_data) / 1e6:.2f} MB train / {len(val_data) / 1e6:.2f} MB validation bytes; "
          f"model {n_params / 1e6:.2f} M parameters; {args.steps} steps of {args.batch}x{args.seq_len} bytes; "
          f"{torch.get_num_threads()} threads")

    grad_step = torch.compile(grad_step_fn)
    results = {}
    start = time.perf_counter()
    with tqdm(total=args.steps * len(OPTIMIZERS), unit="step") as bar:
        for name, opt_class in OPTIMIZERS.items():
            results[name] = train(name, opt_class, model, initial, grad_step, args, train_data, evals, bar)
    seconds = time.perf_counter() - start

    print(table(results))
    print(f"[demo] losses: mean over {args.eval_batches} fixed batches after training; peak step mem: extra "
          f"resident memory during opt.step (max of {MEMORY_PROBES} probes); "
          f"ms: median after {WARMUP_STEPS} compiling steps; {seconds:.0f} s for three runs")
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta = {"config": config, "parameters": n_params, "seconds": seconds, "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    (args.out / "demo.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    plot(results, args.out / "demo.png", f"byte-level LM on stdlib source, {n_params / 1e6:.2f} M parameters")
    print(f"[demo] wrote {args.out / 'demo.json'} and {args.out / 'demo.png'}")


if __name__ == "__main__":
    main()
