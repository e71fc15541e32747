"""Loads the compiled adagrad8 library."""

from pathlib import Path

import torch

_LIB = next(Path(__file__).parent.glob("*adagrad8*.so"))
torch.ops.load_library(str(_LIB))
