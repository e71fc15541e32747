"""GlobalOptimManager: per-parameter config overrides with bitsandbytes' API.

Unlike bitsandbytes, overrides are keyed by the parameter itself and looked up when the
optimizer steps, so an override applies whether it is made before or after
`register_parameters` (or without it), and each parameter gets its own copy of the values, so
overriding one parameter never changes another's config.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

import torch


class GlobalOptimManager:
    """Singleton: `GlobalOptimManager.get_instance()`."""

    _instance: Optional["GlobalOptimManager"] = None

    def __init__(self) -> None:
        raise RuntimeError("GlobalOptimManager is a singleton: use GlobalOptimManager.get_instance()")

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def initialize(self) -> None:
        """Forget every override (bitsandbytes name)."""
        # id(param) -> (weak reference to it, its overrides); tensors cannot be dict keys by value
        self._overrides: dict[int, tuple[weakref.ref, dict]] = {}
        self._module_overrides: list[tuple[Any, str, dict]] = []

    def register_parameters(self, params: Iterable) -> None:
        """Accepted for bitsandbytes compatibility: overrides are keyed by the parameters
        themselves, so there is nothing to record."""

    def override_config(self, parameters, key: Optional[str] = None, value: Any = None,
                        key_value_dict: Optional[dict] = None) -> None:
        """Override config keys (e.g. "optim_bits", "lr") for one parameter or several."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        if key is not None:
            if key_value_dict is not None:
                raise ValueError("override_config takes key and value, or key_value_dict, not both")
            key_value_dict = {key: value}
        if not key_value_dict:
            raise ValueError("override_config needs key and value, or a non-empty key_value_dict")
        for p in parameters:
            if id(p) not in self._overrides or self._overrides[id(p)][0]() is not p:
                self._overrides[id(p)] = (weakref.ref(p, self._forget(id(p))), {})
            self._overrides[id(p)][1].update(key_value_dict)

    def _forget(self, key: int):
        return lambda ref: self._overrides.pop(key, None) if self._overrides.get(key, (None,))[0] is ref else None

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: dict) -> None:
        """Override config for module.<param_name> (resolved when an optimizer steps)."""
        self._module_overrides.append((module, param_name, dict(config)))

    def has_overrides(self) -> bool:
        """Whether any parameter or module override is registered (else every config is its group's)."""
        return bool(self._overrides or self._module_overrides)

    def overrides_for(self, p: torch.Tensor) -> dict:
        """The override values of one parameter (a fresh dict; empty if none)."""
        found: dict = {}
        for module, name, config in self._module_overrides:
            if getattr(module, name, None) is p:
                found.update(config)
        entry = self._overrides.get(id(p))
        if entry is not None and entry[0]() is p:
            found.update(entry[1])
        return found
