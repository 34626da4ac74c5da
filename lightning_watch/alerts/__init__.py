"""Early alerts: diagnoses of a sick training run, with evidence and what to try.

- :mod:`~lightning_watch.alerts.alert`: the ``Alert`` record and its codes;
- :mod:`~lightning_watch.alerts.rules`: built-in rules, pure functions of a snapshot;
- :mod:`~lightning_watch.alerts.checks`: one-time checks at the start of fit;
- :mod:`~lightning_watch.alerts.engine`: ``AlertEngine``, snapshots in, alerts out (framework-free);
- :mod:`~lightning_watch.alerts.ledger`: raise once, again when worse, clear after absence;
- :mod:`~lightning_watch.alerts.config`: actions and settings, validated;
- :mod:`~lightning_watch.alerts.agreement`: DDP agreement on "stop"/"raise";
- :mod:`~lightning_watch.alerts.loss`: the loss window and the per-step non-finite guard;
- :mod:`~lightning_watch.alerts.sinks`: where raised alerts go (logging, alerts.jsonl, TensorBoard);
- :mod:`~lightning_watch.alerts.callback`: ``EarlyAlerts``, the Lightning callback.
"""

from lightning_watch.alerts.alert import CODES, SEVERITIES, Alert, AlertCode, AlertError
from lightning_watch.alerts.callback import EarlyAlerts
from lightning_watch.alerts.config import ACTIONS, AlertConfig
from lightning_watch.alerts.engine import AlertEngine, Finding
from lightning_watch.alerts.ledger import AlertLedger
from lightning_watch.alerts.registry import BUILTIN_RULES, DEFAULTS
from lightning_watch.alerts.rules import Rule, RuleContext
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
