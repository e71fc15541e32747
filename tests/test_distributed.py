"""DDP, FSDP2 (DTensor parameters) and distributed checkpoints: 2 ranks on CPU with gloo, launched
here (tests/dist_scenarios.py runs on each rank), compared with one process stepping the same
model on the same global batches (docs/distributed.md)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import dist_scenarios as S
from test_state_dict import _state_equal
from torch_adagrad8 import qmap as Q

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
TIMEOUT_S = 240
SIDE_TOLERANCE = 1.5  # measured: 1.0 to 1.09


def launch(scenario: str, world: int, out: Path) -> list[dict]:
    """Runs scenario on `world` spawned ranks; returns what each rank saved. Ranks that are still
    running after TIMEOUT_S, or when another rank failed, are killed."""
    context = mp.start_processes(S.main, args=(world, scenario, str(out), str(out / f"store-{uuid.uuid4().hex}")),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{scenario} on {world} ranks ran past {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    return [torch.load(f, weights_only=True) for f in sorted(out.glob(f"{scenario}-*.pt"))]


def _equal(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        _state_equal(a["state"][i], b["state"][i])


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return launch("ddp", WORLD, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("bits", [32, 8])
def test_ddp_matches_one_process(ddp, bits):
    """2 DDP ranks, each on half of every global batch, end with the parameters and state of one
    process stepping the same global batches, bit for bit (8-bit: the same codes and scales)."""
    model, opt = S.reference_run(bits, WORLD, range(S.STEPS))
    expected = [p.detach() for p in model.parameters()]
    for rank in ddp:
        assert _equal(rank[bits]["params"], expected)
        _assert_same_state(rank[bits]["optim"], S.full_state(opt))


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return launch("fsdp", WORLD, tmp_path_factory.mktemp("fsdp"))


def _body(params: list) -> list:
    return [p for i, p in enumerate(params) if i != S.SIDE]


def _assert_close_to_unsharded(got: list, bits: int, steps: range = range(S.STEPS), start=None, world=WORLD):
    """32-bit: every parameter bit for bit. 8-bit: the body bit for bit (no block is split), and
    side.weight, whose second shard's blocks are offset from one process's: as close to 32-bit
    state as one 8-bit process is, within SIDE_TOLERANCE (docs/distributed.md)."""
    model, _ = S.reference_run(bits, world, steps, start)
    expected = [p.detach() for p in model.parameters()]
    if bits == 32 or world == 1:  # one rank: its blocks are one process's
        assert _equal(got, expected)
        return
    assert _equal(_body(got), _body(expected))
    model32, _ = S.reference_run(32, world, steps, start)
    exact = model32.side.weight.detach()
    unsharded, sharded = (float((w - exact).abs().max()) for w in (expected[S.SIDE], got[S.SIDE]))
    print(f"side.weight vs 32-bit state: one process {unsharded:.3g}, sharded {sharded:.3g}")
    assert not torch.equal(got[S.SIDE], expected[S.SIDE])  # the offset blocks do quantize differently
    assert sharded <= SIDE_TOLERANCE * unsharded, (sharded, unsharded)


@pytest.mark.parametrize("bits", [32, 8])
def test_fsdp2_matches_one_process(fsdp, bits):
    for rank in fsdp:
        _assert_close_to_unsharded(rank[bits]["params"], bits)


def test_fsdp2_8bit_steps_each_shard_as_a_tensor_of_its_own(fsdp):
    """Exactly: every parameter equals one process in which side.weight's two row shards (4 and
    3 rows) are two parameters, so each has its own blocks."""
    model, _ = S.reference_run(8, WORLD, range(S.STEPS), shard_side=True)
    for rank in fsdp:
        assert _equal(rank[8]["params"], [p.detach() for p in model.parameters()])


@pytest.mark.parametrize("bits", [32, 8])
def test_fsdp2_each_rank_keeps_the_state_of_its_shard(fsdp, bits):
    """State bytes per rank are about half of one process's: shards of 4 and 3 rows of a 7-row
    weight make it uneven, and 8-bit shards have a scale for their last partial block."""
    _, opt = S.reference_run(bits, 1, range(1))
    total = S.state_bytes(opt)
    per_rank = [rank[bits]["state_bytes"] for rank in fsdp]
    print(f"{bits}-bit state bytes per rank: {[f'{b / total:.2%}' for b in per_rank]} of one process's {total}")
    assert all(0.48 * total <= b <= 0.52 * total for b in per_rank), (per_rank, total)
    assert sum(fsdp[0][bits]["local_params"]) + sum(fsdp[1][bits]["local_params"]) == \
        sum(p.numel() for p in S.make_model().parameters())


@pytest.mark.parametrize("bits", [32, 8])
def test_fsdp2_compiled_step_equals_eager_with_one_graph(fsdp, bits):
    """opt.step compiled with fullgraph=True (a graph break would raise) on DTensor parameters:
    one compile for two steps, and the eager run's parameters bit for bit."""
    for rank in fsdp:
        assert rank[f"compiled-{bits}"]["compiles"] == 1
        assert _equal(rank[f"compiled-{bits}"]["params"], rank[bits]["params"])


@pytest.mark.parametrize("bits", [32, 8])
def test_fsdp2_loads_a_whole_state_dict(fsdp, bits):
    """One process's state dict (whole tensors) loads into the shards: given back, it is that
    state again (8-bit: side.weight's offset blocks requantized, so only its step and map)."""
    _, opt = S.reference_run(bits, WORLD, range(S.STEPS))
    expected = S.full_state(opt)
    for rank in fsdp:
        got = rank[f"plain-load-{bits}"]
        if bits == 8:
            for state in (got, expected):
                state["state"][S.SIDE] = {k: v for k, v in state["state"][S.SIDE].items() if k in ("step", "qmap1")}
        _assert_same_state(got, expected)
    if bits == 8:  # side.weight: each rank's rows of the saved accumulator, quantized in the rank's blocks
        saved = opt.state[list(opt.param_groups[0]["params"])[S.SIDE]]
        values = Q.dequantize(saved["state1"], saved["absmax1"], saved["qmap1"]).reshape(7, 300)
        for rows, rank in zip(values.chunk(WORLD), fsdp):
            codes, scales = Q.quantize(rows.contiguous(), saved["qmap1"])
            assert torch.equal(rank["plain-load-side-8"]["state1"], codes)
            assert torch.equal(rank["plain-load-side-8"]["absmax1"], scales)


@pytest.mark.parametrize("bits", [32, 8])
def test_fsdp2_torch_state_dict_is_one_processs(fsdp, bits):
    """torch_state_dict() of the shards (loaded from one process's state dict): DTensor
    accumulators whose whole value is that process's torch_state_dict() (8-bit: but side.weight,
    requantized in the shards' blocks)."""
    _, opt = S.reference_run(bits, WORLD, range(S.STEPS))
    expected = [s["sum"] for s in opt.torch_state_dict()["state"].values()]
    for rank in fsdp:
        got = rank[f"torch-{bits}"]
        assert _equal(got, expected) if bits == 32 else _equal(_body(got), _body(expected))


def test_fsdp2_unsupported_cases_raise_clear_errors(fsdp):
    for rank in fsdp:
        assert rank["errors"] == [
            "parameter param_groups[0]['params'][0] (shape [512, 32]) is sharded (a DTensor); percentile_clipping "
            "needs whole gradient norms, which a shard does not have: use percentile_clipping=100",
            "parameter param_groups[0]['params'][0] (shape [4, 6000]) is a DTensor with placements (Shard(dim=1),); "
            "torch_adagrad8 converts the state of parameters sharded on dim 0 over one mesh dimension (FSDP2's "
            "layout) only",
            "parameter param_groups[0]['params'][0] (shape [4, 6000]) is a DTensor placed (Replicate(),) but its "
            "gradient is placed (Partial(sum),); the step needs the gradient of its own shard",
            "parameter param_groups[0]['params'][0] (shape [4, 6000]) is a complex DTensor; torch_adagrad8 steps it, "
            "but cannot convert its state to or from a state dict",
        ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """torch.distributed.checkpoint round trips: saved by 1 rank, loaded by 2; saved by 2, loaded
    by 2 and by 1. Rank 0's results by name."""
    out = tmp_path_factory.mktemp("dcp")
    results = {}
    for world in (1, WORLD, 1):
        results.update(launch("checkpoint", world, out)[0])
        for f in out.glob("checkpoint-*.pt"):
            f.unlink()
    return results


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("saved,loaded", [(1, WORLD), (WORLD, 1), (WORLD, WORLD), (1, 1)], ids=str)
def test_checkpoint_resumes_at_any_world_size(checkpoints, bits, saved, loaded):
    """The state loaded is the state saved (32-bit, and 8-bit loaded by one rank, bit for bit; 8-bit
    loaded by two: the split block of side.weight requantized). Training then goes on like one
    process that starts from the saved parameters and state, with `loaded` ranks' gradients."""
    start = checkpoints[f"saved-{saved}-{bits}"]["start"]
    result = checkpoints[f"dcp-{saved}-{bits}-into-{loaded}"]
    assert _equal(result["loaded"]["params"], start["params"])
    if bits == 32 or loaded == 1:
        _assert_same_state(result["loaded"]["optim"], start["optim"])
    else:  # all but side.weight's codes and scales, which two shards requantize in their own blocks
        side = {k: v for k, v in start["optim"]["state"][S.SIDE].items() if k not in ("state1", "absmax1")}
        _assert_same_state({"state": {**result["loaded"]["optim"]["state"], S.SIDE: side}},
                           {"state": {**start["optim"]["state"], S.SIDE: side}})
    _assert_close_to_unsharded(result["params"], bits, range(S.STEPS, 2 * S.STEPS), start, world=loaded)
    if saved == loaded:  # the run that never stopped
        uninterrupted = checkpoints[f"saved-{saved}-{bits}"]["params"]
        assert _equal(result["params"], uninterrupted) if bits == 32 or loaded == 1 else \
            _equal(_body(result["params"]), _body(uninterrupted))
