"""lightning_watch: see inside a Lightning training run, and be told early when it is sick.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_watch import Watch
    >>> trainer = Trainer(callbacks=[Watch()], logger=False)
"""

from lightning_watch.alerts import Alert, EarlyAlerts
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

__version__ = "0.1.0"

__all__ = [
    "ActivationScaleMonitor",
    "ActivityRegularizer",
    "ActivityRule",
    "Alert",
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
