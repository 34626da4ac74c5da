"""One-time warnings: a monitor that meets an odd module says so once, not once per step.

Said on rank zero only (Lightning's ``rank_zero_only.rank``), and attributed to the first frame of
the user's code (typically the ``trainer.fit(...)`` line), never to a file of ours or of Lightning.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Hashable

_seen: set[Hashable] = set()

# Frames from these packages are never the place a warning is "about": the user's call is.
# lightning_watch itself, the standard library (contextlib frames sit between Lightning's), and
# the frameworks below, looked up when needed (they may not be imported yet).
_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(os.__file__)) + os.sep,
)
_FRAMEWORKS = ("lightning", "lightning_fabric", "pytorch_lightning", "lightning_utilities", "torch")


class WatchWarning(UserWarning):
    """Category of every warning lightning_watch emits, so users can filter them in one line."""


def on_rank_zero() -> bool:
    """Whether this process is rank zero, as Lightning's strategies set it (always true without DDP)."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _internal_prefixes() -> tuple[str, ...]:
    prefixes = list(_INTERNAL)
    for name in _FRAMEWORKS:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            prefixes.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(prefixes)


def _internal(path: str, prefixes: tuple[str, ...]) -> bool:
    # a user's package installed under the standard library's site-packages is still the user's
    site = f"{os.sep}site-packages{os.sep}" in path or f"{os.sep}dist-packages{os.sep}" in path
    return path.startswith(prefixes[2:] if site else prefixes) or path.startswith(prefixes[0])


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` made by the caller that points at the user's code.

    Counts the frames of lightning_watch, Lightning and torch above the caller; a warning raised
    with no user frame at all (a Trainer driven by a tool) points at the outermost frame.
    """
    prefixes = _internal_prefixes()
    frame = sys._getframe(2)  # the frame of whoever called our caller
    level = 2
    while frame is not None and _internal(os.path.abspath(frame.f_code.co_filename), prefixes):
        frame = frame.f_back
        level += 1
    return level


def say(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` on rank zero, attributed to the user's code."""
    if on_rank_zero():
        warnings.warn(message, category, stacklevel=user_stacklevel())


def warn_once(key: Hashable, message: str) -> None:
    """Emit ``message`` as a :class:`WatchWarning` the first time ``key`` is seen in this process.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_once("doctest-key", "odd module"); warn_once("doctest-key", "odd module")
        >>> [str(w.message) for w in caught]
        ['odd module']
    """
    if key in _seen:
        return
    _seen.add(key)
    if on_rank_zero():
        warnings.warn(message, WatchWarning, stacklevel=user_stacklevel())


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
