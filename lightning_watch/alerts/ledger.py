"""Which alerts are active: raise once, again when worse, clear after absence. Pure Python."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from lightning_watch.alerts.alert import Alert, severity_rank

#: codes whose evidence gets worse as it gets smaller
LOWER_IS_WORSE = frozenset({"vanishing_gradients", "tiny_updates", "loss_plateau"})

#: an alert is cleared after this many rule evaluations without it
CLEAR_AFTER = 2

#: an active alert is raised again when its evidence moves this factor further past the threshold
WORSE_FACTOR = 10.0


@dataclass
class _Active:
    severity: str
    value: float
    absent: int = 0
    cleared: bool = False


class AlertLedger:
    """The de-duplication ledger of raised alerts, keyed by ``(code, module)``.

    An alert is raised the first time it is found; again only if it gets worse (a higher
    severity, or evidence :data:`WORSE_FACTOR` times further past its threshold) or comes back
    after it cleared (absent for :data:`CLEAR_AFTER` evaluations of the rules that produce it).

    Example:
        >>> ledger = AlertLedger()
        >>> a = Alert("dead_units", "warning", 9, 0, "fc1", 0.8, 0.7, "m", "h")
        >>> len(ledger.update([a], covered={"dead_units"})), len(ledger.update([a], covered={"dead_units"}))
        (1, 0)
        >>> _ = ledger.update([], {"dead_units"}); _ = ledger.update([], {"dead_units"})
        >>> len(ledger.update([a], covered={"dead_units"}))  # cleared, then back
        1
    """

    def __init__(self) -> None:
        self._active: dict[tuple[str, str | None], _Active] = {}

    def update(self, found: Iterable[Alert], covered: Iterable[str] = ()) -> list[Alert]:
        """Record this evaluation's findings; returns those to raise (new, worse or back).

        ``covered``: the codes whose rules ran in this evaluation; an active alert of such a
        code that was not found counts one absence.
        """
        to_raise: list[Alert] = []
        present = set()
        for alert in found:
            present.add(alert.key)
            state = self._active.get(alert.key)
            if state is None or state.cleared or _worse(alert, state):
                self._active[alert.key] = _Active(alert.severity, alert.value)
                to_raise.append(alert)
            else:
                state.absent = 0
        covered = set(covered)
        for key, state in self._active.items():
            if key[0] in covered and key not in present and not state.cleared:
                state.absent += 1
                state.cleared = state.absent >= CLEAR_AFTER
        return to_raise

    def active(self) -> list[tuple[str, str | None]]:
        """Keys of the alerts raised and not cleared."""
        return [key for key, state in self._active.items() if not state.cleared]

    def state_dict(self) -> list[list[Any]]:
        return [[code, module, asdict(state)] for (code, module), state in self._active.items()]

    def load_state_dict(self, state: list[list[Any]]) -> None:
        self._active = {(code, module): _Active(**fields) for code, module, fields in state}


def _worse(alert: Alert, state: _Active) -> bool:
    if severity_rank(alert.severity) > severity_rank(state.severity):
        return True
    new, old = abs(alert.value), abs(state.value)
    if not (math.isfinite(new) and math.isfinite(old)) or new == 0 or old == 0:
        return False
    ratio = old / new if alert.code in LOWER_IS_WORSE else new / old
    return ratio >= WORSE_FACTOR
