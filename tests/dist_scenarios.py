"""What each rank runs in tests/test_distributed.py: launched with torch.multiprocessing (spawn),
gloo on CPU, one thread per rank. Results go to files in the launch's work directory; the test
process compares them with one process stepping the same model (`reference_run`).

Kept free of pytest so that the spawned ranks import only torch and torch_adagrad8.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import torch_adagrad8 as A

BATCH, STEPS = 16, 3
LR = 0.05


class Model(torch.nn.Module):
    """`body`: weights of 16384 and 153600 elements (8-bit state), each rank's half of which
    starts on a 256-element block, and a 3 x 300 weight and biases under min_8bit_size (32-bit
    state), the 3-row ones in uneven shards (2 rows and 1). `side`: a weight of 7 x 300 (8-bit
    state) whose shards (4 and 3 rows) are uneven and split a block. Its loss term is separate, so no other gradient depends on it: the tests can hold
    body to exact equality while side's split block is quantized per shard."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 512), torch.nn.Tanh(), torch.nn.Linear(512, 300),
                                        torch.nn.Tanh(), torch.nn.Linear(300, 3))
        self.side = torch.nn.Linear(300, 7, bias=False)

    def forward(self, x):
        return self.body(x).square().mean() + self.side(x.repeat(1, 10)[:, :300]).square().mean()


def make_model() -> torch.nn.Module:
    return Model()


SIDE = 6  # position of side.weight in parameters()


def make_optimizer(params, bits: int):
    cls = A.Adagrad8bit if bits == 8 else A.Adagrad32bit
    return cls(params, lr=LR, lr_decay=0.01, weight_decay=1e-3, initial_accumulator_value=0.1, min_8bit_size=1000)


def batch(step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The global batch of `step`, or rank's equal part of it."""
    x = torch.randn(BATCH, 32, generator=torch.Generator().manual_seed(1000 + step))
    part = BATCH // world
    return x[rank * part:(rank + 1) * part]


def loss_of(model, x) -> torch.Tensor:
    return model(x)


def full(t):
    """A plain tensor of t's whole value (DTensors gathered)."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().clone()


def full_state(opt) -> dict:
    sd = opt.state_dict()
    return {"param_groups": sd["param_groups"],
            "state": {i: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in sd["state"].items()}}


def reference_grads(model, step: int, world: int) -> list[torch.Tensor]:
    """One process's gradients equal to `world` ranks' averaged ones: each rank's part of the
    batch separately, then the mean (what DDP and FSDP2 compute; the sum of two is exact in any
    order, and halving is exact)."""
    params = list(model.parameters())
    parts = [torch.autograd.grad(loss_of(model, batch(step, r, world)), params) for r in range(world)]
    return [sum(gs[1:], gs[0]) / world if world > 1 else gs[0] for gs in zip(*parts)]


def reference_run(bits: int, world: int, steps: range, start: dict | None = None, shard_side: bool = False):
    """One process: the model (from start's parameters and optimizer state, if given) stepped
    with `world` ranks' gradients over `steps`. shard_side: side.weight steps as FSDP2's row
    shards would, one separate tensor per shard (8-bit state whatever their size, as the whole
    weight has), which is what sharded ranks do."""
    torch.set_num_threads(1)
    model = make_model()
    params = list(model.parameters())
    pieces = [torch.nn.Parameter(rows.clone()) for rows in model.side.weight.detach().chunk(world)] if shard_side \
        else []
    groups = [{"params": [p for p in params if not (pieces and p is model.side.weight)]}]
    opt = make_optimizer(groups + ([{"params": pieces, "min_8bit_size": 1}] if pieces else []), bits)
    if start is not None:
        with torch.no_grad():
            for p, v in zip(params, start["params"]):
                p.copy_(v)
        # an 8-bit start loads into 32-bit state as its dequantized accumulator
        opt.load_state_dict({**start["optim"], "param_groups": [{**g, "optim_bits": bits}
                                                                for g in start["optim"]["param_groups"]]})
    for step in steps:
        grads = reference_grads(model, step, world)
        for p, g in zip(params, grads):
            p.grad = g
        for piece, g in zip(pieces, grads[SIDE].chunk(world)):
            piece.grad = g.clone()
        opt.step()
        if pieces:
            with torch.no_grad():
                model.side.weight.copy_(torch.cat(pieces))
    return model, opt


# ---- what the ranks run ------------------------------------------------------------------

def _train(model, opt, steps, rank, world, compiled_step=None):
    for step in steps:
        loss_of(model, batch(step, rank, world)).backward()
        (compiled_step or opt.step)()
        opt.zero_grad()


def _sharded_model():
    from torch.distributed.fsdp import fully_shard
    model = make_model()
    for layer in [*model.body, model.side]:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def state_bytes(opt) -> int:
    """Bytes of every state tensor but the map (one, shared by every 8-bit state)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
               if k != "qmap1" and isinstance(v, torch.Tensor))


def ddp(rank, world, out: Path):
    from torch.nn.parallel import DistributedDataParallel
    results = {}
    for bits in (32, 8):
        model = DistributedDataParallel(make_model())
        opt = make_optimizer(model.parameters(), bits)
        _train(model, opt, range(STEPS), rank, world)
        results[bits] = {"params": [full(p) for p in model.parameters()], "optim": full_state(opt)}
    torch.save(results, out / f"ddp-{rank}.pt")


def fsdp(rank, world, out: Path):
    """FSDP2 training, eager and with opt.step compiled (fullgraph), and the state each rank keeps."""
    results = {}
    for bits in (32, 8):
        model = _sharded_model()
        opt = make_optimizer(model.parameters(), bits)
        _train(model, opt, range(STEPS), rank, world)
        results[bits] = {"params": [full(p) for p in model.parameters()], "optim": full_state(opt),
                         "state_bytes": state_bytes(opt),
                         "local_params": [p.to_local().numel() for p in model.parameters()]}
        model = _sharded_model()
        opt = make_optimizer(model.parameters(), bits)
        _train(model, opt, range(1), rank, world)
        from torch._dynamo.testing import CompileCounterWithBackend
        torch._dynamo.reset()
        compiles = CompileCounterWithBackend("inductor")
        step = torch.compile(opt.step, fullgraph=True, backend=compiles)
        _train(model, opt, range(1, STEPS), rank, world, compiled_step=step)
        results[f"compiled-{bits}"] = {"params": [full(p) for p in model.parameters()], "compiles": compiles.frame_count}
        # a whole (unsharded) state dict, as one process saves it, loads into the shards
        _, plain = reference_run(bits, world, range(STEPS))
        model = _sharded_model()
        opt = make_optimizer(model.parameters(), bits)
        opt.load_state_dict(plain.state_dict())
        results[f"plain-load-{bits}"] = full_state(opt)
        results[f"plain-load-side-{bits}"] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                              for k, v in opt.state[model.side.weight].items()}
        results[f"torch-{bits}"] = [full(s["sum"]) for s in opt.torch_state_dict()["state"].values()]
    results["errors"] = _errors()
    torch.save(results, out / f"fsdp-{rank}.pt")


def _errors() -> list[str]:
    """What the optimizers say to sharded parameters they cannot serve."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    messages = []
    model = _sharded_model()
    model(batch(0)).backward()
    opt = A.Adagrad8bit(model.parameters(), percentile_clipping=90)
    try:
        opt.step()
    except ValueError as e:
        messages.append(str(e))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    columns = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6000), mesh, [Shard(1)]))
    columns.grad = distribute_tensor(torch.ones(4, 6000), mesh, [Shard(1)])
    opt = A.Adagrad8bit([columns])
    opt.step()  # any shard steps
    try:
        opt.state_dict()
    except ValueError as e:
        messages.append(str(e))
    from torch.distributed.tensor import DTensor, Partial, Replicate
    replica = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6000), mesh, [Replicate()]))
    replica.grad = DTensor.from_local(torch.ones(4, 6000), mesh, [Partial()])  # not yet summed over ranks
    try:
        A.Adagrad8bit([replica]).step()
    except ValueError as e:
        messages.append(str(e))
    waves = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6000, dtype=torch.complex64), mesh, [Shard(0)]))
    waves.grad = distribute_tensor(torch.ones(4, 6000, dtype=torch.complex64), mesh, [Shard(0)])
    opt = A.Adagrad32bit([waves])
    opt.step()
    try:
        opt.state_dict()
    except ValueError as e:
        messages.append(str(e))
    return messages


def _save(model, opt, where: Path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(where))


def _load(model, opt, where: Path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=str(where))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def checkpoint(rank, world, out: Path):
    """For each width: load each checkpoint another world size saved (dcp-<world>-<bits>) into a
    fresh model and continue. Then, the first time at this world size: train from scratch, save
    dcp-<world>-<bits> and continue (the run that never stopped), and load it back into a fresh
    model and continue the same steps."""
    results = {}
    for bits in (32, 8):
        for saved in sorted(out.glob(f"dcp-*-{bits}")):
            if saved.name != f"dcp-{world}-{bits}":
                results[f"{saved.name}-into-{world}"] = _resume(saved, bits, rank, world)
        where = out / f"dcp-{world}-{bits}"
        if where.exists():
            continue
        model = _sharded_model()
        opt = make_optimizer(model.parameters(), bits)
        _train(model, opt, range(STEPS), rank, world)
        start = {"params": [full(p) for p in model.parameters()], "optim": full_state(opt)}
        _save(model, opt, where)
        _train(model, opt, range(STEPS, 2 * STEPS), rank, world)
        results[f"saved-{world}-{bits}"] = {"start": start, "params": [full(p) for p in model.parameters()]}
        results[f"dcp-{world}-{bits}-into-{world}"] = _resume(where, bits, rank, world)
    torch.save(results, out / f"checkpoint-{world}-{len(list(out.glob(f'checkpoint-{world}-*-{rank}.pt')))}-{rank}.pt")


def _resume(saved: Path, bits: int, rank: int, world: int) -> dict:
    model = _sharded_model()
    opt = make_optimizer(model.parameters(), bits)
    _load(model, opt, saved)
    loaded = {"params": [full(p) for p in model.parameters()], "optim": full_state(opt)}
    _train(model, opt, range(STEPS, 2 * STEPS), rank, world)
    return {"loaded": loaded, "params": [full(p) for p in model.parameters()]}


SCENARIOS = {"ddp": ddp, "fsdp": fsdp, "checkpoint": checkpoint}


def main(rank: int, world: int, scenario: str, out: str, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        SCENARIOS[scenario](rank, world, Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()
