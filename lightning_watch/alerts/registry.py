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


def required_metrics(rules: tuple[Rule, ...], disabled: set[str]) -> set[str]:
    """The metrics the rules with an enabled code read (their ``requires``): what probes must measure.

    Example:
        >>> "input_mean" in required_metrics(BUILTIN_RULES, set())
        True
        >>> "input_mean" in required_metrics(BUILTIN_RULES, {"unnormalized_inputs"})
        False
    """
    return {
        metric
        for rule in rules
        if any(code not in disabled for code in getattr(rule, "codes", ()))
        for metric in getattr(rule, "requires", ())
    }
