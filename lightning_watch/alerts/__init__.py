"""Early alerts: diagnoses of a sick training run, with evidence and what to try.

- :mod:`~lightning_watch.alerts.alert`: the ``Alert`` record and its codes;
- :mod:`~lightning_watch.alerts.rules`: built-in rules, pure functions of a snapshot;
- :mod:`~lightning_watch.alerts.detectors`: detectors of faults from the bug taxonomy, also rules;
- :mod:`~lightning_watch.alerts.registry`: every built-in rule and its default settings;
- :mod:`~lightning_watch.alerts.checks`, ``frozen``, ``framework_warnings``: one-time checks of a fit;
- :mod:`~lightning_watch.alerts.probes`: what the detectors measure beyond the monitors;
- :mod:`~lightning_watch.alerts.engine`: ``AlertEngine``, snapshots in, alerts out (framework-free);
- :mod:`~lightning_watch.alerts.ledger`: raise once, again when worse, clear after absence;
- :mod:`~lightning_watch.alerts.config`: actions and settings, validated;
- :mod:`~lightning_watch.alerts.agreement`: DDP agreement on "stop"/"raise";
- :mod:`~lightning_watch.alerts.loss`: the loss window and the per-step non-finite guard;
- :mod:`~lightning_watch.alerts.sinks`: where raised alerts go (logging, alerts.jsonl, TensorBoard);
- :mod:`~lightning_watch.alerts.callback`: ``EarlyAlerts``, the Lightning callback.

Names are imported on first use (PEP 562): the record, the rules and the registry are torch-free,
and the command line reads them without importing torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module defining it; edit this table when a name moves between modules
_LAZY: dict[str, str] = {
    "ACTIONS": "lightning_watch.alerts.config",
    "AlertConfig": "lightning_watch.alerts.config",
    "EarlyAlerts": "lightning_watch.alerts.callback",
    "AlertEngine": "lightning_watch.alerts.engine",
    "Finding": "lightning_watch.alerts.engine",
    "AlertLedger": "lightning_watch.alerts.ledger",
    "CODES": "lightning_watch.alerts.alert",
    "SEVERITIES": "lightning_watch.alerts.alert",
    "Alert": "lightning_watch.alerts.alert",
    "AlertCode": "lightning_watch.alerts.alert",
    "AlertError": "lightning_watch.alerts.alert",
    "BUILTIN_RULES": "lightning_watch.alerts.registry",
    "DEFAULTS": "lightning_watch.alerts.registry",
    "Rule": "lightning_watch.alerts.rules",
    "RuleContext": "lightning_watch.alerts.rules",
    "JSONL_NAME": "lightning_watch.alerts.alert",
    "AlertWarning": "lightning_watch.alerts.sinks",
}

__all__ = [  # every name of the table above (tests check they agree)
    "ACTIONS",
    "BUILTIN_RULES",
    "CODES",
    "DEFAULTS",
    "JSONL_NAME",
    "SEVERITIES",
    "Alert",
    "AlertCode",
    "AlertConfig",
    "AlertEngine",
    "AlertError",
    "AlertLedger",
    "AlertWarning",
    "EarlyAlerts",
    "Finding",
    "Rule",
    "RuleContext",
]

if TYPE_CHECKING:
    from lightning_watch.alerts.alert import CODES, JSONL_NAME, SEVERITIES, Alert, AlertCode, AlertError
    from lightning_watch.alerts.callback import EarlyAlerts
    from lightning_watch.alerts.config import ACTIONS, AlertConfig
    from lightning_watch.alerts.engine import AlertEngine, Finding
    from lightning_watch.alerts.ledger import AlertLedger
    from lightning_watch.alerts.registry import BUILTIN_RULES, DEFAULTS
    from lightning_watch.alerts.rules import Rule, RuleContext
    from lightning_watch.alerts.sinks import AlertWarning


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
