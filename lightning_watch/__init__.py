"""lightning_watch: see inside a Lightning training run, and be told early when it is sick.

The public names are imported on first use (PEP 562), so that reading logs (``lightning-watch
report``) never pays for importing torch and Lightning.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_watch import Watch
    >>> trainer = Trainer(callbacks=[Watch()], logger=False)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module defining it (imported on first access of the name)
_LAZY: dict[str, str] = {
    "ActivationScaleMonitor": "lightning_watch.monitors",
    "ActivityRegularizer": "lightning_watch.regularize",
    "ActivityRule": "lightning_watch.regularize",
    "Alert": "lightning_watch.alerts",
    "AlertError": "lightning_watch.alerts",
    "DeadUnitMonitor": "lightning_watch.monitors",
    "EarlyAlerts": "lightning_watch.alerts",
    "GradientNormMonitor": "lightning_watch.monitors",
    "ParameterDeltaMonitor": "lightning_watch.monitors",
    "Snapshot": "lightning_watch.snapshot",
    "Watch": "lightning_watch.watch",
    "WatchMonitor": "lightning_watch.monitors",
    "WatchWarning": "lightning_watch.warn",
    "scalar_tag": "lightning_watch.snapshot",
}

__all__ = [  # every name of the table above (tests check they agree)
    "ActivationScaleMonitor",
    "ActivityRegularizer",
    "ActivityRule",
    "Alert",
    "AlertError",
    "DeadUnitMonitor",
    "EarlyAlerts",
    "GradientNormMonitor",
    "ParameterDeltaMonitor",
    "Snapshot",
    "Watch",
    "WatchMonitor",
    "WatchWarning",
    "__version__",
    "scalar_tag",
]

if TYPE_CHECKING:  # static tools see the real names; nothing is imported at run time
    from lightning_watch.alerts import Alert, AlertError, EarlyAlerts
    from lightning_watch.monitors import (
        ActivationScaleMonitor,
        DeadUnitMonitor,
        GradientNormMonitor,
        ParameterDeltaMonitor,
        WatchMonitor,
    )
    from lightning_watch.regularize import ActivityRegularizer, ActivityRule
    from lightning_watch.snapshot import Snapshot, scalar_tag
    from lightning_watch.warn import WatchWarning
    from lightning_watch.watch import Watch


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute read
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
