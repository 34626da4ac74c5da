"""One checkpoint key per callback instance, built once.

Lightning reads ``state_key`` around every hook call (it names the profiler's regions), so each
of this package's callbacks derives it from its configuration once and keeps it.
"""

from __future__ import annotations

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

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_cached_state_key")
        if key is None:
            key = self.__dict__["_cached_state_key"] = self._generate_state_key(**self._state_fields())
        return key
