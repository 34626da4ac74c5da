"""One-time warnings: a monitor that meets an odd module says so once, not once per step."""

from __future__ import annotations

import warnings
from collections.abc import Hashable

_seen: set[Hashable] = set()


class WatchWarning(UserWarning):
    """Category of every warning lightning_watch emits, so users can filter them in one line."""


def warn_once(key: Hashable, message: str) -> None:
    """Emit ``message`` as a :class:`WatchWarning` the first time ``key`` is seen in this process."""
    if key in _seen:
        return
    _seen.add(key)
    warnings.warn(message, WatchWarning, stacklevel=2)


def reset_warnings() -> None:
    """Forget which warnings were emitted (tests use this)."""
    _seen.clear()
