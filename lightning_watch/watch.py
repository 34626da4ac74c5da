"""``Watch``: the four monitors in one callback, sharing one set of hooks and one read per step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer

from lightning_watch.alerts.engine import EarlyAlerts
from lightning_watch.cadence import logging_step, steps_optimizer
from lightning_watch.monitors import (
    ActivationScaleMonitor,
    DeadUnitMonitor,
    GradientNormMonitor,
    ParameterDeltaMonitor,
    WatchMonitor,
)
from lightning_watch.monitors._base import SnapshotListener, publish
from lightning_watch.snapshot import Snapshot
from lightning_watch.views.live import WatchViews
from lightning_watch.writers import add_histograms, add_layout

_FAMILIES = {
    "gradients": GradientNormMonitor,
    "deltas": ParameterDeltaMonitor,
    "activations": ActivationScaleMonitor,
    "dead_units": DeadUnitMonitor,
}


class Watch(Callback):
    """All four monitors in one callback: the recommended entry point.

    The monitors share the capture engine (one forward hook per module, one pass over each
    output), the cadence, and one read per logging step (one collective under DDP, one
    device-to-host transfer), so ``Watch()`` costs less than the four monitors side by side.

    Args:
        gradients: ``True``/``False`` or a configured :class:`GradientNormMonitor`.
        deltas: ``True``/``False`` or a configured :class:`ParameterDeltaMonitor`.
        activations: ``True``/``False`` or a configured :class:`ActivationScaleMonitor`.
        dead_units: ``True``/``False`` or a configured :class:`DeadUnitMonitor`.
        include, exclude, types: module selection passed to every monitor built here (each
            monitor's default selection applies when all three are ``None``).
        log_every_n_steps, sample_every_n_steps, histogram_every_n_steps: cadence passed to
            every monitor built here (``None``: the Trainer's ``log_every_n_steps`` but at least
            10, five samples per window but at most one batch in five, no histograms; see
            :mod:`lightning_watch.cadence`).
        alerts: ``True`` (default) builds an :class:`~lightning_watch.EarlyAlerts` fed by this
            Watch's snapshots; pass a configured ``EarlyAlerts`` to choose actions and thresholds,
            or ``False`` for none. ``watch.alerts`` lists the alerts raised.
        report: print the health report (one row per layer, then the alerts) when fit ends;
            ``None`` follows the Trainer's ``enable_progress_bar``. ``health.md``/``health.json``
            in the log directory and TensorBoard text ``watch_report/health`` are written either way.
        pictures: draw layer x step heat maps (dead fraction, update ratio) and a gradient-flow
            chart into TensorBoard's Images tab (needs matplotlib; skipped with one warning without).

    Raises:
        ValueError: if a family argument is neither a bool nor a monitor of that family, or if
            every family is switched off.

    Logged Metrics:
        The union of the four monitors' metrics (see each class): ``watch/grad_norm/<module>``,
        ``watch/update_ratio/<module>``, ``watch/act_rms/<module>``, ``watch/dead_frac/<module>``, …

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[Watch()], logger=False)
        >>> trainer = Trainer(callbacks=[Watch(dead_units=False, log_every_n_steps=10)], logger=False)
    """

    def __init__(
        self,
        gradients: bool | GradientNormMonitor = True,
        deltas: bool | ParameterDeltaMonitor = True,
        activations: bool | ActivationScaleMonitor = True,
        dead_units: bool | DeadUnitMonitor = True,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: Sequence[type | str] | None = None,
        log_every_n_steps: int | None = None,
        sample_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        alerts: bool | EarlyAlerts = True,
        report: bool | None = None,
        pictures: bool = True,
    ) -> None:
        shared = {
            "include": include,
            "exclude": exclude,
            "types": types,
            "log_every_n_steps": log_every_n_steps,
            "sample_every_n_steps": sample_every_n_steps,
            "histogram_every_n_steps": histogram_every_n_steps,
        }
        self.monitors: list[WatchMonitor] = []
        for arg, (family, cls) in zip((gradients, deltas, activations, dead_units), _FAMILIES.items()):
            if isinstance(arg, cls):
                monitor = arg
            elif isinstance(arg, bool):
                monitor = cls(**shared) if arg else None
            else:
                raise ValueError(f"`{family}` must be True, False or a {cls.__name__}, got {arg!r}.")
            if monitor is not None:
                monitor._managed = True
                self.monitors.append(monitor)
        if not self.monitors:
            raise ValueError("`Watch` needs at least one monitor; every family was switched off.")
        self._listeners: list[SnapshotListener] = []
        self.last_snapshot: Snapshot | None = None
        # end-of-fit health report and TensorBoard pictures (lightning_watch/views/)
        self.views = WatchViews(report=report, pictures=pictures)
        self.add_listener(self.views.on_snapshot)
        if isinstance(alerts, bool):
            alerts = EarlyAlerts() if alerts else None
        elif not isinstance(alerts, EarlyAlerts):
            raise ValueError(f"`alerts` must be True, False or an EarlyAlerts, got {alerts!r}.")
        self.early_alerts: EarlyAlerts | None = alerts
        if alerts is not None:
            alerts._attach(self, log_every_n_steps, sample_every_n_steps)

    @property
    def alerts(self) -> list:
        """The alerts raised so far (empty when alerts are off)."""
        return self.early_alerts.alerts if self.early_alerts is not None else []

    @property
    def state_key(self) -> str:
        # Lightning reads `state_key` around every hook call (profiler names): build it once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(monitors=[m.state_key for m in self.monitors])
        return key

    def add_listener(self, listener: SnapshotListener) -> None:
        """Call ``listener(trainer, pl_module, snapshot)`` after each publication."""
        self._listeners.append(listener)

    def monitor(self, cls: type[WatchMonitor]) -> WatchMonitor | None:
        """The bundled monitor of class ``cls``, if enabled."""
        return next((m for m in self.monitors if isinstance(m, cls)), None)

    # ------------------------------------------------------------------ delegation
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for monitor in self.monitors:
            monitor.setup(trainer, pl_module, stage)
        if self.early_alerts is not None:
            self.early_alerts._setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for monitor in self.monitors:
            monitor.on_fit_start(trainer, pl_module)
        metrics = [m for monitor in self.monitors for m in monitor.METRICS]
        global_metrics = [m for monitor in self.monitors for m in monitor.GLOBAL_METRICS]
        add_layout(trainer, metrics, global_metrics)
        notice = next(filter(None, (m._cadence.floor_notice("Watch") for m in self.monitors)), None)
        if notice:
            rank_zero_info(notice)
        self.views.reset()
        if self.early_alerts is not None:
            self.early_alerts._on_fit_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.views.on_train_end(trainer, pl_module, self.alerts)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.early_alerts is not None:
            self.early_alerts._on_train_start(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for monitor in self.monitors:
            monitor.teardown(trainer, pl_module, stage)
        if self.early_alerts is not None:
            self.early_alerts._teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        for monitor in self.monitors:
            monitor.on_exception(trainer, pl_module, exception)
        if self.early_alerts is not None:  # its first-batch recorder may still hold forward pre-hooks
            self.early_alerts._on_exception(trainer, pl_module, exception)
        self.views.on_exception(trainer, pl_module, self.alerts)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.early_alerts is not None:  # first: its one-time checks run before any hook is armed
            self.early_alerts._on_train_batch_start(trainer, pl_module, batch, batch_idx)
        for monitor in self.monitors:
            monitor.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        for monitor in self.monitors:
            monitor.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.early_alerts is not None:  # first: the loss joins this step's read
            self.early_alerts._on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        for monitor in self.monitors:
            monitor.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not steps_optimizer(trainer):
            return
        step = logging_step(trainer)
        # monitors handed in pre-configured may keep their own cadence: each is read when it is due
        histograms = {}
        for monitor in self.monitors:
            if monitor._cadence.is_histogram_step(step):
                histograms.update(monitor._histograms())
        add_histograms(trainer, histograms, step)
        due = [m for m in self.monitors if m._cadence.is_log_step(step)]
        if self.early_alerts is not None:  # the loss statistics join the same read
            due += self.early_alerts._due_monitors(step)
        if due:
            self.last_snapshot = publish(trainer, pl_module, due, self._listeners)

    def state_dict(self) -> dict[str, Any]:
        state = {type(m).__name__: m.state_dict() for m in self.monitors}
        if self.early_alerts is not None:
            state["EarlyAlerts"] = self.early_alerts._engine_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for monitor in self.monitors:
            if type(monitor).__name__ in state_dict:
                monitor.load_state_dict(state_dict[type(monitor).__name__])
        if self.early_alerts is not None and "EarlyAlerts" in state_dict:
            self.early_alerts._load_engine_state(state_dict["EarlyAlerts"])
