"""Re-diagnosis from logged values: the built-in rules run again on a finished run's event files.

A run that had no alert engine (only monitors), or whose engine never reached a logging step, still
has its ``watch/*`` scalars. Rebuilding one :class:`~lightning_watch.snapshot.Snapshot` per logging
step from them and running :data:`~lightning_watch.alerts.rules.BUILTIN_RULES` with their default
settings gives every such run a verdict, on a machine with no torch and no Lightning.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lightning_watch.alerts.alert import SEVERITIES
from lightning_watch.alerts.registry import BUILTIN_RULES, DEFAULTS, run_rules
from lightning_watch.alerts.rules import RuleContext
from lightning_watch.snapshot import Snapshot
from lightning_watch.views.eventfiles import parse_tag

#: snapshots the rules may look back on (the live engine's default ``history``)
HISTORY = 64
#: codes whose rule needs what the event file does not hold: the loss of the first few steps
#: (the live engine averages them; the logged window means start later)
NOT_OFFLINE: frozenset[str] = frozenset({"loss_plateau"})


@dataclass
class OfflineDiagnosis:
    """What the built-in rules found on the logged statistics of one run.

    Attributes:
        steps: logging steps rebuilt from the event file.
        alerts: alert records (dicts, ``"source": "offline"``), one per ``(code, module)``: the
            first step it was found, its worst severity, and in ``"steps"`` how many logging steps.
        rules: names of the rules run.
        skipped: ``code -> why`` for rules not re-run offline.
    """

    steps: int = 0
    alerts: list[dict[str, Any]] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def snapshots_from_scalars(scalars: dict[str, list[tuple[int, float]]]) -> list[Snapshot]:
    """One snapshot per step that has any of our training statistics, oldest first.

    Validation statistics (``val_*``) are left out: they are written at other steps and would break
    the rules' "held for N logging steps" windows. Module order is the order tags were first written.

    Example:
        >>> snaps = snapshots_from_scalars({"watch/act_rms/fc1": [(9, 2.0), (19, 3.0)], "epoch": [(19, 1.0)]})
        >>> [(s.step, s.epoch, s.modules("act_rms")) for s in snaps]
        [(9, 0, {'fc1': 2.0}), (19, 1, {'fc1': 3.0})]
    """
    epochs = {step: int(value) for step, value in scalars.get("epoch", [])}
    by_step: dict[int, Snapshot] = {}
    for tag, points in scalars.items():
        parsed = parse_tag(tag)
        if parsed is None or parsed[0].startswith("val_"):
            continue
        metric, module = parsed
        for step, value in points:
            snap = by_step.get(step)
            if snap is None:
                snap = by_step[step] = Snapshot(step=step, epoch=epochs.get(step, 0))
            snap.put(metric, value, module)
    return [by_step[step] for step in sorted(by_step)]


def forward_order(snapshots: list[Snapshot]) -> list[str]:
    """Module names in first-written order (registration order, which follows the forward)."""
    order: dict[str, None] = {}
    for snap in snapshots:
        for row in snap.per_module.values():
            order.update(dict.fromkeys(row))
    return list(order)


def rediagnose(scalars: dict[str, list[tuple[int, float]]]) -> OfflineDiagnosis:
    """Run the built-in rules (default settings) over the logged statistics of one run.

    Example:
        >>> scalars = {"watch/act_rms/fc1": [(9, 116.0), (19, 120.0)], "watch/act_rms/out": [(9, 1.0), (19, 1.0)]}
        >>> [(a["code"], a["module"], a["step"]) for a in rediagnose(scalars).alerts]
        [('activation_explosion', 'fc1', 19)]
    """
    snapshots = snapshots_from_scalars(scalars)
    result = OfflineDiagnosis(steps=len(snapshots))
    rules = [r for r in BUILTIN_RULES if not set(getattr(r, "codes", ())) <= NOT_OFFLINE]
    result.rules = [r.__name__ for r in rules]
    result.skipped = {code: "needs the loss of the first steps, which is not logged" for code in sorted(NOT_OFFLINE)}
    settings = {code: dict(params) for code, params in DEFAULTS.items()}
    # the first logged window mean stands in for the live engine's initial loss (first few steps):
    # larger than or equal to it on a falling loss, so divergence is judged conservatively
    losses = [s.get("loss") for s in snapshots if math.isfinite(s.get("loss"))]
    ctx = RuleContext(
        history=deque(maxlen=HISTORY),
        forward_order=forward_order(snapshots),
        initial_loss=losses[0] if losses else math.nan,
        settings=settings,
    )
    found: dict[tuple[str, str | None], dict[str, Any]] = {}
    for snap in snapshots:
        # the live engine's loop (a rule tripping on partial logs is skipped, not the report)
        for _, _, produced in run_rules(rules, snap, ctx, disabled=NOT_OFFLINE):
            for alert in produced:
                record = found.get(alert.key)
                if record is None:
                    record = found[alert.key] = {**alert.to_dict(), "source": "offline", "steps": 0}
                elif SEVERITIES.index(alert.severity) > SEVERITIES.index(record["severity"]):
                    record.update({k: v for k, v in alert.to_dict().items() if k != "step"}, severity=alert.severity)
                record["steps"] += 1
        ctx.history.append(snap)
    result.alerts = list(found.values())
    return result
