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


def warn_write_failed(target: str, err: BaseException, consequence: str = "") -> None:
    """One :class:`WatchWarning` per ``target`` (a path or a logger) that could not be written.

    Writing is never allowed to stop training: a read-only log directory, a full disk or a logger
    that raises costs that output, nothing else.
    """
    tail = f" {consequence}" if consequence else " Training continues; later writes to it are retried silently."
    warn_once(("write-failed", target), f"lightning_watch could not write {target}: {type(err).__name__}: {err}.{tail}")


def reset_warnings() -> None:
    """Forget which warnings were emitted (tests use this)."""
    _seen.clear()
