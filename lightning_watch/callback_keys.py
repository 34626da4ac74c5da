"""One checkpoint key per callback instance, built once.

Lightning reads ``state_key`` around every hook call of every callback (it names the profiler's
regions), so each of this package's callbacks derives it from its configuration once and keeps it
as a plain instance attribute: a property would cost a call per hook (measured about 1 µs each,
six hooks a batch; ``benchmarks/step_cost.py``).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from lightning.pytorch.callbacks import Callback


class CachedStateKey(Callback):
    """A ``Callback`` whose ``state_key`` is built on first use from :meth:`_state_fields`.

    Example:
        >>> class Mine(CachedStateKey):
        ...     def _state_fields(self): return {"rules": ["a"]}
        >>> Mine().state_key
        "Mine{'rules': ['a']}"
    """

    def _state_fields(self) -> dict[str, Any]:
        """The configuration that tells two instances of the class apart."""
        return {}

    @cached_property
    def state_key(self) -> str:  # type: ignore[override]  # a non-data descriptor: later reads hit __dict__
        return self._generate_state_key(**self._state_fields())
