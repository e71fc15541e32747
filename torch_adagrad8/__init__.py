"""8-bit and 32-bit Adagrad for PyTorch, as torch.compile-native custom ops."""

from torch_adagrad8 import _ops  # noqa: F401  (loads and registers adagrad8::step)

__all__: list[str] = []
