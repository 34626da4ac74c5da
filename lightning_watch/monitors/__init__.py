"""The four monitors, one per family of statistics."""

from lightning_watch.monitors.activation_scale import ActivationScaleMonitor
from lightning_watch.monitors.base import WatchMonitor
from lightning_watch.monitors.dead_unit import DeadUnitMonitor
from lightning_watch.monitors.gradient_norm import GradientNormMonitor
from lightning_watch.monitors.parameter_delta import ParameterDeltaMonitor

__all__ = [
    "ActivationScaleMonitor",
    "DeadUnitMonitor",
    "GradientNormMonitor",
    "ParameterDeltaMonitor",
    "WatchMonitor",
]
