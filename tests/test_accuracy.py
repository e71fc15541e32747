"""8-bit accuracy targets (issue 6, docs/accuracy.md): with the default configuration, protocols
A and B end at most 0.4x as far from 32-bit Adagrad as bitsandbytes' Adagrad8bit (or, where
bitsandbytes is not installed, as our implementation of its signed map, which measures 0.99x
and 0.55x of it: docs/accuracy.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

import torch_adagrad8 as A
from torch_adagrad8 import qmap as Q

_spec = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "tools" / "quality.py")
quality = sys.modules["quality"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(quality)


@pytest.mark.parametrize("protocol", ["A", "B"])
def test_default_8bit_is_within_0_4x_of_bitsandbytes_error(protocol):
    """tools/quality.py's protocol run itself: every variant against torch.optim.Adagrad."""
    names = {"Adagrad8bit (default)", "qmap='dynamic'", "qmap='signed'"}  # and bitsandbytes, if installed
    curves = quality.run_protocol(protocol, 1 << 20, 100, tqdm(disable=True), only=names)
    final = {name: c["param"][-1] for name, c in curves.items()}
    peer = next((name for name in final if name.startswith("bitsandbytes")), "qmap='signed'")
    ours = final["Adagrad8bit (default)"]
    # > 0: the protocol really quantizes. The protocols are deterministic (A: 4.35e-3 against a
    # bound of 4.48e-3, the same bits on every instruction set; docs/accuracy.md)
    assert 0 < ours <= 0.4 * final[peer], final
    assert ours < final["qmap='dynamic'"]  # the reason the default map changed (docs/accuracy.md)


def test_default_state_is_at_most_1_02_bytes_per_parameter():
    p = torch.nn.Parameter(torch.randn(1 << 20))
    opt = A.Adagrad8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    assert torch.equal(st["qmap1"], Q.MAPS[Q.DEFAULT_MAP]())
    tensors = [t for k, t in st.items() if k != "qmap1" and isinstance(t, torch.Tensor)]  # not block_size
    per_param = sum(t.numel() * t.element_size() for t in tensors) / p.numel()
    assert per_param <= 1.02  # codes + one float32 scale per 256 (+ the step); the map is shared
