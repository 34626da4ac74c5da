"""``Watch``: the four monitors and the alert engine in one callback, sharing one set of hooks and one read per step."""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer

from lightning_watch.alerts import EarlyAlerts
from lightning_watch.cadence import QuietSteps, logging_step, steps_optimizer
from lightning_watch.callback_keys import CachedStateKey
from lightning_watch.hub import SnapshotListener, StatHub
from lightning_watch.monitors import (
    ActivationScaleMonitor,
    DeadUnitMonitor,
    GradientNormMonitor,
    ParameterDeltaMonitor,
    WatchMonitor,
)
from lightning_watch.monitors.bundle import FAMILIES, MonitorBundle
from lightning_watch.pace import DEFAULT_BUDGET, Pace, check_budget
from lightning_watch.snapshot import Snapshot
from lightning_watch.subscription import HookSubscription
from lightning_watch.views.live import WatchViews
from lightning_watch.writers import progress_bar_metrics


class Watch(CachedStateKey):
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
            10; per window, five sampled batches for dead units and one for activation scales, at
            most one batch in five; no histograms; see :mod:`lightning_watch.cadence`).
        alerts: ``True`` (default) builds an :class:`~lightning_watch.EarlyAlerts` fed by this
            Watch's snapshots; pass a configured ``EarlyAlerts`` to choose actions and thresholds,
            or ``False`` for none. ``watch.alerts`` lists the alerts raised.
        report: print the health report (one row per layer, then the alerts) when fit ends;
            ``None`` follows the Trainer's ``enable_progress_bar``. ``health.md``/``health.json``
            in the log directory and TensorBoard text ``watch_report/health`` are written either way.
        pictures: draw layer x step heat maps (dead fraction, update ratio) and a gradient-flow
            chart into TensorBoard's Images tab (needs matplotlib; skipped with one warning without).
        final_pictures: ``None`` (default) draws the end-of-fit pictures when they fit the pictures'
            budget of 1 % of the fit's wall time (a short fit skips them, and its report says so);
            ``True`` always; ``False`` never.
        budget: the share of the run's wall time the statistics may take (default 2 %). Where a
            logging window costs more (small models on fast steps), the default intervals become
            2, 4 or 8 times longer after the first four windows, said once in the log;
            ``watch.global/watch_overhead`` is the estimated share per window. Intervals given
            explicitly never stretch; ``None``: never stretch (see :mod:`lightning_watch.pace`).

    Raises:
        ValueError: if a family argument is neither a bool nor a monitor of that family, or if
            every family is switched off.

    Logged Metrics:
        The union of the four monitors' metrics (see each class): ``watch.grad_norm/<NN>.<module>``,
        ``watch.update_ratio/<NN>.<module>``, ``watch.act_rms/<NN>.<module>``, ``watch.dead_frac/<NN>.<module>``, …

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
        final_pictures: bool | None = None,
        budget: float | None = DEFAULT_BUDGET,
    ) -> None:
        shared = {
            "include": include,
            "exclude": exclude,
            "types": types,
            "log_every_n_steps": log_every_n_steps,
            "sample_every_n_steps": sample_every_n_steps,
            "histogram_every_n_steps": histogram_every_n_steps,
        }
        monitors: list[WatchMonitor] = []
        for arg, (family, cls) in zip((gradients, deltas, activations, dead_units), FAMILIES.items()):
            if isinstance(arg, cls):
                monitors.append(arg)
            elif isinstance(arg, bool):
                if arg:
                    monitors.append(cls(**shared))
            else:
                raise ValueError(f"`{family}` must be True, False or a {cls.__name__}, got {arg!r}.")
        if not monitors:
            raise ValueError("`Watch` needs at least one monitor; every family was switched off.")
        self._bundle = MonitorBundle(monitors)
        self._listeners: list[SnapshotListener] = []
        self._busy = False  # whether any monitor works on the current batch
        self._plain = False  # whether the current batch is a quiet one: nothing to do but keep the loss
        self._hooks = HookSubscription(self)  # which of our hooks Lightning calls on a batch
        self._quiet = QuietSteps()  # the steps before the next one anything is due at
        self._shown: int | None = None  # alert count in the progress bar
        self._budget = check_budget(budget)
        self._pace: Pace | None = None  # the default cadence's time budget (lightning_watch/pace.py)
        self._pace_state: dict[str, Any] | None = None  # from a checkpoint, applied at fit start
        # end-of-fit health report and TensorBoard pictures (lightning_watch/views/)
        self.views = WatchViews(report=report, pictures=pictures, final_pictures=final_pictures)
        if isinstance(alerts, bool):
            alerts = EarlyAlerts() if alerts else None
        elif not isinstance(alerts, EarlyAlerts):
            raise ValueError(f"`alerts` must be True, False or an EarlyAlerts, got {alerts!r}.")
        self.early_alerts: EarlyAlerts | None = alerts
        if alerts is not None:
            alerts.bind(log_every_n_steps, sample_every_n_steps)

    @property
    def monitors(self) -> list[WatchMonitor]:
        """The bundled monitors, one per enabled family."""
        return self._bundle.monitors

    @property
    def last_snapshot(self) -> Snapshot | None:
        """The latest snapshot published during this Watch's fit (``None`` before the first)."""
        return self.__dict__.get("_last_snapshot")

    @property
    def alerts(self) -> list:
        """The alerts raised so far (empty when alerts are off)."""
        return self.early_alerts.alerts if self.early_alerts is not None else []

    def _state_fields(self) -> dict[str, Any]:
        return {"monitors": [m.state_key for m in self.monitors]}

    def add_listener(self, listener: SnapshotListener) -> None:
        """Call ``listener(trainer, pl_module, snapshot)`` after each publication."""
        self._listeners.append(listener)

    def monitor(self, cls: type[WatchMonitor]) -> WatchMonitor | None:
        """The bundled monitor of class ``cls``, if enabled."""
        return next((m for m in self.monitors if isinstance(m, cls)), None)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._last_snapshot = None
        self._shown = None
        self._bundle.prepare(trainer, pl_module)
        if self.early_alerts is not None:
            self.early_alerts.prepare(trainer, pl_module)
        hub = StatHub.for_trainer(trainer)
        if self.early_alerts is not None:  # before the views: alerts raised at a step are in its report
            hub.listen(self.early_alerts.on_snapshot)
        hub.listen(self.views.on_snapshot)
        hub.listen(self._on_snapshot)
        for listener in self._listeners:
            hub.listen(listener)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bundle.start(trainer, pl_module)
        if self.early_alerts is not None:
            self.early_alerts.start(trainer, pl_module)
        self._pace = self._make_pace(trainer)
        sources = [*self.monitors, self._pace]
        if self.early_alerts is not None:
            sources += self.early_alerts.sources()
        StatHub.for_trainer(trainer).join(self, sources)
        self._pace.open_window(perf_counter(), logging_step(trainer))
        # the first batch runs the one-time checks; a quiet batch calls no hook but its loss's
        keep = ["on_train_batch_end"]
        if self.early_alerts is not None and self.early_alerts.records_backward:
            keep.append("on_before_backward")  # the loss of a manual `training_step` that returns nothing
        self._quiet = QuietSteps(self._hooks, keep)
        self._plain = False
        notice = self._bundle.floor_notice("Watch")
        if notice:
            rank_zero_info(notice)
        self.views.reset()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.early_alerts is not None:
            self.early_alerts.train_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        StatHub.for_trainer(trainer).flush(trainer, pl_module)  # a fit that ends inside a window is judged too
        self.views.on_train_end(trainer, pl_module, self.alerts)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._leave(trainer)
        if self.early_alerts is not None:
            self.early_alerts.stop(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no `teardown` after an exception: remove every hook we put on the model
        self._leave(trainer)
        if self.early_alerts is not None:  # its first-batch recorder may still hold forward pre-hooks
            self.early_alerts.abort()
        self.views.on_exception(trainer, pl_module, self.alerts)

    def _leave(self, trainer: pl.Trainer) -> None:
        self._hooks.stop()
        self._bundle.stop()
        hub = StatHub.for_trainer(trainer)
        for listener in (self.views.on_snapshot, self._on_snapshot, *self._listeners):
            hub.unlisten(listener)
        if self.early_alerts is not None:
            hub.unlisten(self.early_alerts.on_snapshot)
        hub.leave(self)

    def _on_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: Snapshot) -> None:
        self._last_snapshot = snapshot

    def _make_pace(self, trainer: pl.Trainer) -> Pace:
        cadences = [m.cadence for m in self.monitors if m.cadence is not None]
        if self.early_alerts is not None and self.early_alerts.cadence is not None:
            cadences.append(self.early_alerts.cadence)
        hub = StatHub.for_trainer(trainer)

        def stretched(pace: Pace) -> None:
            # every rank stretches at the same read (the share is reduced in it): say it once
            self._bundle.cadences_changed()
            hub.cadences_changed()
            if self._pace_state is None:  # not a checkpoint's stretch, which was said in its fit
                rank_zero_info(pace.notice("Watch"))

        pace = Pace(cadences, self._budget, on_stretch=stretched)
        if self._pace_state is not None:
            pace.load_state_dict(self._pace_state)
            self._pace_state = None
        return pace

    # ------------------------------------------------------------------ the batch
    # The fast path: `_quiet` knows the first step at which any monitor, probe, one-time check or
    # the hub has work. Lightning calls no hook of ours on a batch before it but `on_train_batch_end`
    # (lightning_watch/subscription.py), where the loss joins its window (no kernel on the CPU, one
    # on an accelerator, never a host sync); where Lightning's dispatcher cannot skip hooks, the
    # batch costs one comparison in `on_train_batch_start` and the other hooks return at once.
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._plain = self._quiet.quiet(trainer)
        if self._plain:
            return
        if self.early_alerts is not None:  # first: its one-time checks run before any hook is armed
            self.early_alerts.begin_batch(trainer, pl_module, batch)
        self._busy = self._bundle.begin_batch(logging_step(trainer))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._plain:
            return
        if self.early_alerts is not None:
            self.early_alerts.before_optimizer_step(trainer, pl_module, optimizer)
        if self._busy:
            self._bundle.before_optimizer_step(trainer, pl_module, optimizer, logging_step(trainer))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        alerts = self.early_alerts
        if alerts is None:
            return
        if not self._plain:
            alerts.before_backward(trainer, pl_module, loss)
        elif alerts.records_backward:  # the loss of a manual `training_step` that returns nothing
            alerts.record_backward(loss)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        alerts = self.early_alerts
        if self._plain:
            if alerts is not None:
                alerts.keep_loss(outputs)  # judged on the next sampled step (no kernel, no read here)
            if self._quiet.plain_end(trainer):
                self._pace.quiet_end(perf_counter())  # the next batch may be busy: it is timed
            return
        if alerts is not None:  # first: the loss joins this step's read
            alerts.end_batch(trainer, pl_module, outputs)
        stepped = steps_optimizer(trainer)
        step = logging_step(trainer)
        if self._busy:
            self._bundle.end_batch(trainer, pl_module, stepped, step)
        if stepped:
            hub = StatHub.for_trainer(trainer)
            self._pace.measure(step)  # the window before this batch, should this step be read
            hub.batch_end(self, trainer, pl_module)
            busy = [self._bundle.next_busy, hub.next_due] + ([alerts.next_busy] if alerts is not None else [])
            self._plain = self._quiet.after(step, *busy)
        self._show_health(trainer, pl_module)
        self._pace.busy_end(perf_counter())  # last: this batch's time includes its read

    def _show_health(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the health line in the progress bar (`watch_warnings=0`): logged when the count changes
        # (Lightning keeps the last value shown), so the user need not open TensorBoard to learn of a problem
        if self.early_alerts is None or trainer.progress_bar_callback is None:
            return
        count = len(self.alerts)
        if count != self._shown:
            self._shown = count
            pl_module.log_dict(progress_bar_metrics(self.alerts), prog_bar=True, logger=False, rank_zero_only=True)

    # ------------------------------------------------------------ validation (monitors and probes that measure it)
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pace is not None:
            self._pace.gap()  # not a training step: the next batch is not timed
        if self.early_alerts is not None:
            self.early_alerts.validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.early_alerts is not None:
            self.early_alerts.validation_end()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bundle.call("on_validation_epoch_start", trainer, pl_module)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._bundle.call("on_validation_batch_start", trainer, pl_module, *args)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._bundle.call("on_validation_batch_end", trainer, pl_module, *args)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bundle.call("on_validation_epoch_end", trainer, pl_module)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = {type(m).__name__: m.state_dict() for m in self.monitors}
        if self.early_alerts is not None:
            state["EarlyAlerts"] = self.early_alerts.state_dict()
        if self._pace is not None:
            state["Pace"] = self._pace.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for monitor in self.monitors:
            if type(monitor).__name__ in state_dict:
                monitor.load_state_dict(state_dict[type(monitor).__name__])
        if self.early_alerts is not None and "EarlyAlerts" in state_dict:
            self.early_alerts.load_state_dict(state_dict["EarlyAlerts"])
        self._pace_state = state_dict.get("Pace")  # a resumed fit keeps its stretched cadence
