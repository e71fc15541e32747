"""Parameters sharded as DTensors (FSDP2's `fully_shard`).

The optimizers step each rank's local shard and keep plain state for it: 32-bit accumulators
shaped like the shard, or 8-bit codes with one scale per block of the *shard* (blocks start at
the shard's first element). State dicts hold what one unsharded optimizer would save, so that
torch.distributed.checkpoint can reshard them to any world size:

- `sum`: a DTensor placed like the parameter.
- `state1`: a DTensor of codes placed like the parameter, in blocks of the *whole* tensor, and
  `absmax1`: every block's scale (a plain tensor, the same on every rank). A shard whose
  boundaries fall on block boundaries keeps its codes and scales bit for bit; a block that two
  shards split is requantized with the larger of their scales (docs/distributed.md).

Only shards that are one contiguous range of the flattened parameter can be converted: Shard(0)
on one mesh dimension (FSDP2's layout), Replicate on the others.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torch_adagrad8 import qmap as Q

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
else:  # a torch without distributed support has no sharded parameters
    DTensor = None


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's part of t (t itself when it is not a DTensor)."""
    return t.to_local() if is_sharded(t) else t


def _flat_range(p: Tensor, name: str) -> tuple[int, int, Optional[int]]:
    """(first flat index, element count) of p's local shard in the flattened parameter, and the
    mesh dimension it is sharded over (None: replicated)."""
    if p.is_complex():  # its state is real pairs: another element count than the parameter's
        raise ValueError(f"{name} is a complex DTensor; torch_adagrad8 steps it, but cannot convert its state "
                         "to or from a state dict")
    shard_dim = None
    for mesh_dim, placement in enumerate(p.placements):
        if type(placement) is Shard and placement.dim == 0 and shard_dim is None:  # not FSDP2+TP's _StridedShard
            shard_dim = mesh_dim
        elif not isinstance(placement, Replicate):
            raise ValueError(f"{name} is a DTensor with placements {tuple(p.placements)}; torch_adagrad8 converts the "
                             "state of parameters sharded on dim 0 over one mesh dimension (FSDP2's layout) only")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = 1
    for size in p.shape[1:]:
        row *= size
    count = 1
    for size in shape:
        count *= size
    return (offset[0] * row if len(offset) else 0), count, shard_dim


def like_param(local_tensor: Tensor, p: Tensor) -> Tensor:
    """A DTensor of p's shape and placement whose local part (p's shard) is local_tensor."""
    _flat_range(p, "a sharded parameter")
    return DTensor.from_local(local_tensor.reshape(local(p).shape), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def global_state(state: dict, p: Tensor, block: int, name: str) -> dict:
    """p's local state (plain tensors) as one unsharded optimizer's state. A collective for 8-bit
    state: every rank holding a shard of p must call it."""
    start, count, shard_dim = _flat_range(p, name)
    out = {k: v for k, v in state.items() if k not in ("sum", "state1", "absmax1")}
    if "sum" in state:
        out["sum"] = like_param(state["sum"], p)
        return out
    values = Q.dequantize(state["state1"], state["absmax1"], state["qmap1"], block).reshape(-1)
    size = block if block > 0 else max(p.numel(), 1)
    owner = torch.arange(start, start + count, device=values.device) // size  # each element's block
    magnitude = torch.where(torch.isfinite(values), values.abs(), 0.0)
    scales = magnitude.new_zeros(Q.scale_count(p.numel(), block)).scatter_reduce_(0, owner, magnitude, "amax")
    if shard_dim is not None:  # blocks that two shards split take the larger scale
        torch.distributed.all_reduce(scales, torch.distributed.ReduceOp.MAX, group=p.device_mesh.get_group(shard_dim))
    codes = Q.nearest_codes(Q.normalize(values, scales[owner]), state["qmap1"])
    out["state1"], out["absmax1"] = like_param(codes, p), scales
    return out


def local_state(saved: dict, p: Tensor, saved_block: int) -> dict:
    """A saved (unsharded-layout) state as plain tensors for p's local shard: the accumulator as
    float32 `sum` values of the shard, which loading then keeps or quantizes in the shard's
    blocks. saved holds DTensors (as a distributed checkpoint loads them) or whole tensors."""
    start, count, _ = _flat_range(p, "a sharded parameter")
    out = {k: v for k, v in saved.items() if k not in ("sum", "state1", "absmax1", "qmap1")}

    def mine(t: Tensor) -> Tensor:
        """The elements of p's shard, from a DTensor placed like p or a whole tensor."""
        if is_sharded(t):
            if tuple(t.placements) != tuple(p.placements):
                t = t.redistribute(p.device_mesh, p.placements)
            return t.to_local().reshape(-1)
        return t.reshape(-1)[start:start + count]

    if "state1" in saved and saved["state1"].dtype == torch.uint8:
        absmax = saved["absmax1"]
        scales = (absmax.full_tensor() if is_sharded(absmax) else absmax).float()
        size = saved_block if saved_block > 0 else max(p.numel(), 1)
        codes = mine(saved["state1"]).long()
        owner = torch.arange(start, start + count, device=codes.device) // size
        qmap = local(saved["qmap1"]).float().to(codes.device)
        out["sum"] = qmap[codes] * scales.to(codes.device)[owner]
    else:
        source = saved["state1"] if "state1" in saved else saved["sum"]
        out["sum"] = mine(source).float()
    return out
