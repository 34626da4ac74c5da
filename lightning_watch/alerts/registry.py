"""Every built-in rule and its default settings, in one place: adding a detector is one line here.

Rules come from :mod:`~lightning_watch.alerts.rules` (symptoms of the monitors' statistics) and
:mod:`~lightning_watch.alerts.detectors` (faults, from the probes' statistics); one-time checks
(:mod:`~lightning_watch.alerts.checks`) have settings here too.
"""

from __future__ import annotations

from lightning_watch.alerts import detectors, rules
from lightning_watch.alerts.rules import Rule

#: built-in snapshot rules, in evaluation order
BUILTIN_RULES: tuple[Rule, ...] = (*rules.BUILTIN_RULES, *detectors.DETECTORS)

#: default settings of every built-in code
DEFAULTS: dict[str, dict[str, float]] = {
    **rules.DEFAULTS,
    **detectors.DEFAULTS,
    # one-time checks of the callback
    "frozen_parameters": {"threshold": 0.0},
    "framework_warning": {"threshold": 0.0, "batches": 3},
}


def requirements(rule: Rule) -> tuple[str, ...]:
    """The metric names ``rule`` reads (``requires``); empty when it does not say."""
    return tuple(getattr(rule, "requires", ()))
