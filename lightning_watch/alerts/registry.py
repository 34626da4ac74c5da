"""Every built-in rule and its default settings, in one place: adding a detector is one line here.

Rules come from :mod:`~lightning_watch.alerts.rules` (symptoms of the monitors' statistics) and
:mod:`~lightning_watch.alerts.detectors` (faults, from the probes' statistics); one-time checks
(:mod:`~lightning_watch.alerts.checks`) have settings here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from lightning_watch.alerts import detectors, rules
from lightning_watch.alerts.alert import Alert
from lightning_watch.alerts.rules import Rule, RuleContext
from lightning_watch.snapshot import Snapshot

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
        >>> "input_mean" in required_metrics(BUILTIN_RULES, {"unnormalized_inputs", "train_val_input_shift"})
        False
    """
    return {
        metric
        for rule in rules
        if any(code not in disabled for code in getattr(rule, "codes", ()))
        for metric in getattr(rule, "requires", ())
    }


#: the codes that still mean something once a value is NaN or infinite
NON_FINITE = frozenset({"non_finite_loss", "non_finite_gradients"})


def run_rules(
    rules_: Iterable[Rule],
    snapshot: Snapshot,
    ctx: RuleContext,
    disabled: frozenset[str] | set[str] = frozenset(),
    on_error: Callable[[Rule, Exception], None] | None = None,
) -> Iterator[tuple[Rule, list[str], list[Alert]]]:
    """Run ``rules_`` on ``snapshot``: ``(rule, enabled codes, alerts)`` for each rule that ran.

    The one loop the live engine and the offline re-diagnosis share. A built-in rule with no enabled
    code does not run, nor, once the loss or a gradient is NaN/Inf, one that is not about that (every
    other statistic is garbage then: a NaN gradient row looks "dead"). Alerts of disabled codes are
    dropped; a rule that raises is handed to ``on_error`` and skipped.
    """
    broken = snapshot.get("loss_nonfinite", default=0.0) > 0 or snapshot.get("grad_nonfinite", default=0.0) > 0
    for rule in rules_:
        codes = [c for c in getattr(rule, "codes", ()) if c not in disabled]
        if rule in BUILTIN_RULES and (not codes or (broken and not set(codes) & NON_FINITE)):
            continue
        try:
            produced = [a for a in rule(snapshot, ctx) if a.code not in disabled]
        except Exception as err:  # a broken rule must not break training, nor a report
            if on_error is not None:
                on_error(rule, err)
            continue
        yield rule, codes, produced
