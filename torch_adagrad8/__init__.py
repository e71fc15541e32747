"""8-bit and 32-bit Adagrad for PyTorch, as torch.compile-native custom ops."""

from torch_adagrad8 import _ops  # noqa: F401  (loads the library: registers the adagrad8 ops)
from torch_adagrad8 import functional
from torch_adagrad8.manager import GlobalOptimManager
from torch_adagrad8.optimizer import Adagrad, Adagrad8bit, Adagrad32bit

__all__ = ["Adagrad", "Adagrad8bit", "Adagrad32bit", "GlobalOptimManager", "functional"]
