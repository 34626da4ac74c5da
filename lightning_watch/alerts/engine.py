"""``AlertEngine``: snapshots in, alerts out — framework-free (no Lightning, no torch).

The engine holds what judging needs: the validated :class:`AlertConfig`, the rules (built-in
and the user's), a bounded history of snapshots, the module forward order, the initial loss,
and the :class:`AlertLedger` that decides which findings are new. Everything that touches a
Trainer (the loss, the fit-start checks, writing alerts, stopping, DDP agreement) lives in
the thin callback :class:`~lightning_watch.alerts.EarlyAlerts` that feeds it.

Adding a detector: write a rule (``rule(snapshot, context) -> alerts`` with a ``codes``
attribute) in a module of its own, add its code to :mod:`~lightning_watch.alerts.alert` and
register it in :data:`~lightning_watch.alerts.registry.BUILTIN_RULES` (one line).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_watch.alerts.alert import Alert
from lightning_watch.alerts.config import AlertConfig
from lightning_watch.alerts.ledger import AlertLedger
from lightning_watch.alerts.registry import BUILTIN_RULES, run_rules
from lightning_watch.alerts.rules import RuleContext
from lightning_watch.snapshot import Snapshot
from lightning_watch.warn import warn_once


@dataclass
class Finding:
    """An alert to raise now, with the action its code asks for.

    ``shared`` is true when every process makes the same finding (a rule on the reduced
    snapshot), so under DDP it can be acted on at once; a rank-local finding must be agreed.
    """

    alert: Alert
    action: str
    shared: bool = False


@dataclass
class AlertEngine:
    """Judges snapshots: runs the rules, de-duplicates, remembers.

    Example:
        >>> engine = AlertEngine(AlertConfig.from_args(settings={"dead_units": {"patience": 1}}))
        >>> snap = Snapshot(step=9, epoch=0); snap.put("dead_frac", 0.9, module="fc1")
        >>> [(f.alert.code, f.alert.module, f.action) for f in engine.evaluate(snap)]
        [('dead_units', 'fc1', 'warn')]
        >>> engine.evaluate(snap)  # raised once
        []
    """

    config: AlertConfig = field(default_factory=AlertConfig.from_args)
    #: the initial training loss, asked for on each evaluation (NaN while unknown)
    initial_loss: Callable[[], float] = field(default=lambda: math.nan, repr=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything of the previous fit."""
        self.alerts: list[Alert] = []
        self.ledger = AlertLedger()
        self.history: deque[Snapshot] = deque(maxlen=self.config.history)
        self.forward_order: list[str] = []

    def context(self, final: bool = False) -> RuleContext:
        return RuleContext(
            history=self.history,
            forward_order=self.forward_order,
            initial_loss=self.initial_loss(),
            settings=self.config.settings,
            final=final,
        )

    def evaluate(self, snapshot: Snapshot, final: bool = False) -> list[Finding]:
        """Run every enabled rule on ``snapshot`` (``final``: the end of fit); returns the findings to raise now."""
        # the end of fit, when its last step was judged already: only the rules about the end run again
        rejudged = final and bool(self.history) and self.history[-1].step == snapshot.step
        if rejudged:
            self.history.pop()  # the rules see the history before this step, as when it was first judged
        rules = [r for r in (*BUILTIN_RULES, *self.config.rules) if not rejudged or getattr(r, "at_end", False)]
        found: list[Alert] = []
        shared: set[int] = set()
        covered: set[str] = set()
        for rule, codes, produced in run_rules(rules, snapshot, self.context(final), self.config.disabled, _warn):
            covered.update(codes)
            found += produced
            if rule in BUILTIN_RULES:
                # the same reduced snapshot and the same rule state on every rank: every rank
                # makes the same finding and may act on it now
                shared.update(id(a) for a in produced)
        findings = self.record(found, covered, shared=shared)
        self.history.append(snapshot)
        return findings

    def record(
        self, found: Iterable[Alert], covered: Iterable[str] = (), shared: set[int] = frozenset()
    ) -> list[Finding]:
        """Pass findings (of rules, or of checks outside the engine) through the ledger."""
        new = self.ledger.update([a for a in found if a.code not in self.config.disabled], covered)
        self.alerts.extend(new)
        return [Finding(a, self.config.action(a.code), id(a) in shared) for a in new]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "alerts": [a.to_dict() for a in self.alerts],
            "active": self.ledger.state_dict(),
            "history": [asdict(s) for s in self.history],
            "forward_order": list(self.forward_order),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alerts = [Alert.from_dict(a) for a in state.get("alerts", [])]
        self.ledger.load_state_dict(state.get("active", []))
        self.history.clear()
        self.history.extend(Snapshot(**s) for s in state.get("history", []))
        self.forward_order = list(state.get("forward_order", []))


def _warn(rule: object, err: Exception) -> None:
    warn_once(("alert-rule", id(rule)), f"Alert rule {rule!r} failed and is skipped: {err!r}")
