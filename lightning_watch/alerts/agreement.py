"""DDP agreement on "stop" and "raise": rank-local findings travel in the logging step's one read.

A finding every rank makes alike (a rule on the reduced snapshot) is acted on at once. A
rank-local one (a fit-start check, the per-step loss guard, a user rule) is *pending* until the
next read the hub makes anyway: :class:`ActionFlags` adds one max-reduced row of flags to that
read, so afterwards every rank knows whether any rank found a reason to stop or raise, and all
act on the same step. It never causes a read of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_watch.alerts.alert import Alert
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock


class ActionAgreement:
    """Pending, in-flight and agreed "stop"/"raise" actions of one rank.

    Example:
        >>> agreement = ActionAgreement()
        >>> a = Alert("unseeded_run", "warning", 0, 0, None, 0.0, 0.0, "m", "h")
        >>> agreement.defer("stop", a)
        >>> agreement.send()  # this rank's flags in the next read
        [1.0, 0.0]
        >>> agreement.receive([1.0, 0.0]); [(action, alert.code) for action, alert in agreement.take_agreed()]
        [('stop', 'unseeded_run')]
    """

    ACTIONS = ("stop", "raise")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._pending: dict[str, Alert] = {}  # found, not yet sent
        self._sent: dict[str, Alert] = {}  # in the current read
        self._agreed: set[str] = set()  # some rank sent it

    def defer(self, action: str, alert: Alert) -> None:
        """Hold a rank-local ``action`` until the next read tells every rank."""
        self._pending.setdefault(action, alert)

    def send(self) -> list[float]:
        """The pending actions, as the flags this rank contributes to the current read."""
        for action, alert in self._pending.items():
            self._sent.setdefault(action, alert)
        self._pending = {}
        return [float(action in self._sent) for action in self.ACTIONS]

    def receive(self, flags: list[float]) -> None:
        """The flags reduced (max) over ranks."""
        self._agreed = {action for action, flag in zip(self.ACTIONS, flags) if flag > 0}

    def take_agreed(self) -> list[tuple[str, Alert | None]]:
        """Agreed actions, most drastic first, with this rank's alert (``None``: found elsewhere)."""
        agreed, self._agreed = self._agreed, set()
        sent, self._sent = self._sent, {}
        return [(action, sent.get(action)) for action in ("raise", "stop") if action in agreed]

    def take_unsent(self) -> dict[str, Alert]:
        """Everything found and not agreed yet (the end of fit)."""
        pending = {**self._pending, **self._sent}
        self.clear()
        return pending


class ActionFlags:
    """The :class:`ActionAgreement` as a hub source that rides along with reads made anyway."""

    cadence = None  # never due by itself
    rides_along = True

    def __init__(self, agreement: ActionAgreement, device: torch.device) -> None:
        self._agreement = agreement
        self._device = device
        self.KEY = f"ActionFlags@{id(self):x}"  # unique across the sources of one read

    def collect(self) -> StatBlock:
        block = StatBlock()
        block.add_max(self.KEY, torch.tensor(self._agreement.send(), dtype=torch.float32, device=self._device))
        return block

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        self._agreement.receive(values[self.KEY])

    def reset(self) -> None:
        pass

    def histograms(self) -> dict[str, Tensor]:
        return {}


def remote_alert(step: int, epoch: int, rank: int) -> Alert:
    """What a rank raises or stops with when another rank found the reason."""
    return Alert(
        code="remote_alert",
        severity="error",
        step=step,
        epoch=epoch,
        module=None,
        value=math.nan,
        threshold=math.nan,
        message=f"Another process raised an alert (this is rank {rank}).",
        hint="See the alerts of rank zero (alerts.jsonl).",
    )
