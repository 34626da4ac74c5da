"""Early alerts: diagnoses of a sick training run, with evidence and what to try.

Names are imported on first use (PEP 562): the record (``alert.py``) and the rules (``rules.py``)
are torch-free, and the command line reads them without importing torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module defining it; edit this table when a name moves between modules
_LAZY: dict[str, str] = {
    "ACTIONS": "lightning_watch.alerts.engine",
    "EarlyAlerts": "lightning_watch.alerts.engine",
    "CODES": "lightning_watch.alerts.alert",
    "SEVERITIES": "lightning_watch.alerts.alert",
    "Alert": "lightning_watch.alerts.alert",
    "AlertCode": "lightning_watch.alerts.alert",
    "AlertError": "lightning_watch.alerts.alert",
    "BUILTIN_RULES": "lightning_watch.alerts.rules",
    "DEFAULTS": "lightning_watch.alerts.rules",
    "Rule": "lightning_watch.alerts.rules",
    "RuleContext": "lightning_watch.alerts.rules",
    "JSONL_NAME": "lightning_watch.alerts.sinks",
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
    "AlertError",
    "AlertWarning",
    "EarlyAlerts",
    "Rule",
    "RuleContext",
]

if TYPE_CHECKING:
    from lightning_watch.alerts.alert import CODES, SEVERITIES, Alert, AlertCode, AlertError
    from lightning_watch.alerts.engine import ACTIONS, EarlyAlerts
    from lightning_watch.alerts.rules import BUILTIN_RULES, DEFAULTS, Rule, RuleContext
    from lightning_watch.alerts.sinks import JSONL_NAME, AlertWarning


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
