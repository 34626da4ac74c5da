"""Driving several monitors from one callback's hooks, with a fast path for steps where none is due."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer

from lightning_watch.cadence import next_due
from lightning_watch.monitors.activation_scale import ActivationScaleMonitor
from lightning_watch.monitors.base import WatchMonitor
from lightning_watch.monitors.dead_unit import DeadUnitMonitor
from lightning_watch.monitors.gradient_norm import GradientNormMonitor
from lightning_watch.monitors.parameter_delta import ParameterDeltaMonitor

#: the monitor families, by the argument names ``Watch`` takes
FAMILIES: dict[str, type[WatchMonitor]] = {
    "gradients": GradientNormMonitor,
    "deltas": ParameterDeltaMonitor,
    "activations": ActivationScaleMonitor,
    "dead_units": DeadUnitMonitor,
}


class MonitorBundle:
    """The measuring steps of several monitors, run from the hooks of the callback that owns them.

    ``begin_batch`` decides once per batch whether any monitor samples, logs or writes
    histograms at this step; when none does, the other steps of the batch return at once (no
    per-monitor dispatch).

    Example:
        >>> bundle = MonitorBundle([GradientNormMonitor(), DeadUnitMonitor()])
        >>> sorted(type(m).__name__ for m in bundle.monitors)
        ['DeadUnitMonitor', 'GradientNormMonitor']
    """

    def __init__(self, monitors: Sequence[WatchMonitor]) -> None:
        self.monitors = list(monitors)
        self._busy: list[WatchMonitor] = []
        self._sample_intervals: set[int] = set()  # distinct sampling intervals (sampling includes logging)

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for monitor in self.monitors:
            monitor.prepare(trainer, pl_module)

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for monitor in self.monitors:
            monitor.start(trainer, pl_module)
        self._busy = []
        self.cadences_changed()

    def cadences_changed(self) -> None:
        """The monitors' intervals were resolved or stretched (``lightning_watch.pace``)."""
        # a monitor works at a step iff one of its sampling, logging or histogram intervals divides it
        self._sample_intervals = {i for m in self.monitors if m.cadence is not None for i in m.cadence.sample_intervals}

    def next_busy(self, step: int) -> int:
        """The first step ``>= step`` at which some monitor measures (``cadence.NEVER`` if none)."""
        return next_due(step, self._sample_intervals)

    def stop(self) -> None:
        for monitor in self.monitors:
            monitor.stop()
        self._busy = []

    def begin_batch(self, step: int) -> bool:
        """Arm what is due at ``step``; returns whether any monitor works on this batch."""
        if self.next_busy(step) != step:
            self._busy = []
            return False  # the fast path: nothing due, no per-monitor dispatch
        self._busy = [m for m in self.monitors if m.cadence is not None and m.cadence.is_sample_step(step)]
        for monitor in self._busy:
            monitor.begin_batch(step)
        return bool(self._busy)

    def before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, step: int
    ) -> None:
        for monitor in self._busy:
            monitor.before_optimizer_step(trainer, pl_module, optimizer, step)

    def end_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stepped: bool, step: int) -> None:
        for monitor in self._busy:
            monitor.end_batch(trainer, pl_module, stepped, step)
        if stepped:
            self._busy = []

    def floor_notice(self, callback: str) -> str | None:
        return next(filter(None, (m.cadence.floor_notice(callback) for m in self.monitors if m.cadence)), None)

    def call(self, hook: str, *args: Any) -> None:
        """Forward another Lightning hook (validation) to the monitors that define it."""
        for monitor in self.monitors:
            getattr(monitor, hook)(*args)
