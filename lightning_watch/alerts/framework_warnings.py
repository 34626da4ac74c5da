"""PyTorch's own warnings during the first training steps, surfaced as alerts.

Some real bugs make PyTorch warn once and carry on: ``MSELoss`` given ``(N, 1)`` against
``(N,)`` broadcasts to ``(N, N)`` with a ``UserWarning`` that scrolls by in a training log.
:class:`FrameworkWarnings` listens to the warnings shown during the first few training batches
(it wraps ``warnings.showwarning`` for those batches only and passes every warning on unchanged)
and keeps the ``UserWarning``\\ s raised by PyTorch's code, so they become alerts with the step.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from lightning_watch.alerts.alert import Alert
from lightning_watch.alerts.rules import RuleContext
from lightning_watch.alerts.sinks import AlertWarning
from lightning_watch.snapshot import Snapshot
from lightning_watch.warn import WatchWarning

_TORCH_DIR = os.path.dirname(torch.__file__)


class FrameworkWarnings:
    """Records PyTorch ``UserWarning``\\ s shown while it is listening.

    Example:
        >>> recorder = FrameworkWarnings()
        >>> recorder.listen(); recorder.listening
        True
        >>> recorder.stop(); recorder.listening, recorder.seen
        (False, [])
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []  # (category, message, where)
        self._original: Any = None

    @property
    def listening(self) -> bool:
        return self._original is not None

    def listen(self) -> None:
        if self._original is not None:
            return
        self._original = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            ours = issubclass(category, (WatchWarning, AlertWarning))
            if issubclass(category, UserWarning) and not ours and _from_torch(message, filename):
                self.seen.append((category.__name__, str(message), f"{os.path.basename(filename)}:{lineno}"))
            self._original(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning

    def stop(self) -> None:
        if self._original is not None:
            warnings.showwarning = self._original
            self._original = None

    def alerts(self, ctx: RuleContext, at: Snapshot) -> list[Alert]:
        """One ``framework_warning`` per distinct message seen so far (then forgotten)."""
        seen, self.seen = self.seen, []
        out, said = [], set()
        for category, message, where in seen:
            if message in said:
                continue
            said.add(message)
            out.append(
                ctx.alert(
                    "framework_warning",
                    at,
                    None,
                    1.0,
                    ctx.setting("framework_warning", "threshold"),
                    f"PyTorch warned during training step {at.step} ({where}): {message.strip()}",
                    "PyTorch warns when it guesses what you meant (a broadcast loss shape, an implicit softmax "
                    "dimension, a non-leaf `.grad`): read the warning and fix the call it points to.",
                    warning=category,
                    where=where,
                )
            )
        return out


def _from_torch(message: Any, filename: str) -> bool:
    # the warning's location is the caller PyTorch chose (stacklevel): the user's line for functional
    # warnings; PyTorch's own code otherwise. Either way the text comes from torch: check the call stack.
    if filename.startswith(_TORCH_DIR):
        return True
    import traceback

    return any(frame.filename.startswith(_TORCH_DIR) for frame in traceback.extract_stack(limit=12)[:-2])
