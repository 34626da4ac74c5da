"""Early alerts: diagnoses of a sick training run, with evidence and what to try."""

from lightning_watch.alerts.alert import CODES, SEVERITIES, Alert, AlertCode, AlertError
from lightning_watch.alerts.engine import ACTIONS, EarlyAlerts
from lightning_watch.alerts.rules import BUILTIN_RULES, DEFAULTS, Rule, RuleContext
from lightning_watch.alerts.sinks import JSONL_NAME, AlertWarning

__all__ = [
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
