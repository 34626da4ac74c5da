"""``EarlyAlerts``: the Lightning face of the alert engine — the loss, the fit-start checks, actions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

from lightning_watch.alerts.agreement import ActionAgreement, ActionFlags, remote_alert
from lightning_watch.alerts.alert import Alert, AlertError
from lightning_watch.alerts.checks import (
    ForwardRecorder,
    LabelRunCheck,
    check_batch_mixing,
    check_batch_norm,
    check_sampler,
    check_seed,
)
from lightning_watch.alerts.config import AlertConfig
from lightning_watch.alerts.engine import AlertEngine, Finding
from lightning_watch.alerts.framework_warnings import FrameworkWarnings
from lightning_watch.alerts.frozen import check_frozen
from lightning_watch.alerts.loss import LossWindow, extract_loss
from lightning_watch.alerts.probes import (
    GradientHygiene,
    InputProbe,
    LabelProbe,
    LossTrend,
    ModelFacts,
    OutputProbe,
    RecurrentGates,
    UnitSymmetry,
    ValidationInputs,
)
from lightning_watch.alerts.registry import BUILTIN_RULES, required_metrics
from lightning_watch.alerts.rules import Rule
from lightning_watch.alerts.sinks import AlertSinks, AlertWarning
from lightning_watch.cadence import NEVER, Cadence, QuietSteps, check_interval, logging_step, steps_optimizer
from lightning_watch.callback_keys import CachedStateKey
from lightning_watch.capture import is_compiled
from lightning_watch.hub import StatHub, StatSource
from lightning_watch.monitors import WatchMonitor
from lightning_watch.monitors.bundle import FAMILIES, MonitorBundle
from lightning_watch.snapshot import Snapshot
from lightning_watch.subscription import HookSubscription
from lightning_watch.warn import WatchWarning, say


class EarlyAlerts(CachedStateKey):
    """Tells you, early and in plain words, that training is sick, and what to try.

    Rules run on the statistics snapshot of each logging step (no host sync of their own); a
    cheap guard watches the loss every step for NaN/Inf; one-time checks run at the start of
    fit (data order, batch mixing, BatchNorm batch size, seeding). Each alert is raised once per
    code and module, and again only if it gets worse (higher severity, or evidence ten times
    further past its threshold) or comes back after clearing (absent for two evaluations).

    ``Watch()`` includes an ``EarlyAlerts`` by default (``Watch(alerts=EarlyAlerts(...))`` to
    configure it). Used alone, ``EarlyAlerts`` measures what its rules need with monitors of its
    own (which then also write the ``watch/*`` scalars), except the families a standalone monitor
    or a ``Watch`` in the Trainer's callbacks already measures: every callback of this package
    publishes through its Trainer's one :class:`~lightning_watch.hub.StatHub`, so the rules see
    those values too, and every point is written once.

    Under DDP, ``"stop"`` and ``"raise"`` cost no collective of their own: a decision every rank
    takes from the reduced statistics is acted on at once; a rank-local finding (fit-start checks,
    the per-step loss guard, user rules) travels in the next logging step's one read, where every
    rank learns it and acts on the same step. A ``"raise"`` found after the last read is agreed
    when fit ends (one collective per fit, only when some code may raise).

    Args:
        actions: ``code -> "warn" | "stop" | "raise"``. ``"stop"`` sets ``trainer.should_stop``
            (every rank stops on the same step under DDP); ``"raise"`` raises
            :class:`~lightning_watch.alerts.AlertError` carrying the alert (on every rank under
            DDP; ranks that did not find it carry a ``remote_alert``).
        settings: ``code -> {name: value}`` overriding :data:`~lightning_watch.alerts.rules.DEFAULTS`
            (``threshold``, ``patience``, ...), or ``code -> False`` to switch a code off.
        rules: extra user rules, ``rule(snapshot, context) -> iterable of Alert`` (see
            :mod:`lightning_watch.alerts.rules`); a ``codes`` attribute on a rule declares its codes.
        default_action: action for codes not in ``actions``.
        label_batches: number of first batches inspected for single-label runs.
        history: number of past snapshots kept for the rules.
        log_every_n_steps: cadence of the loss window and of the monitors built here when used
            alone (``None``: the Trainer's, at least 10).

    Raises:
        ValueError: for an unknown code, action or setting name, a negative threshold, or a
            patience that is not a positive integer.

    Logged Metrics:
        - ``watch.global/loss``, ``watch.global/loss_min``, ``watch.global/loss_max``,
          ``watch.global/loss_nonfinite``: the training loss over each logging window.
        - TensorBoard text ``alerts/<code>``: one entry per raised alert.
        - ``alerts.jsonl`` in the trainer's log directory: one JSON object per raised alert.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> alerts = EarlyAlerts(actions={"non_finite_loss": "stop"}, settings={"dead_units": {"threshold": 0.9}})
        >>> trainer = Trainer(callbacks=[alerts], logger=False)
        >>> EarlyAlerts(actions={"dead_unit": "stop"})
        Traceback (most recent call last):
        ...
        ValueError: `actions` key must be an alert code, got 'dead_unit'. Valid codes: non_finite_loss, ...
    """

    def __init__(
        self,
        actions: Mapping[str, str] | None = None,
        settings: Mapping[str, Mapping[str, float] | bool] | None = None,
        rules: Sequence[Rule] = (),
        default_action: str = "warn",
        label_batches: int = 4,
        history: int = 64,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.config = AlertConfig.from_args(actions, settings, rules, default_action, label_batches, history)
        self._log_every_n_steps = check_interval("log_every_n_steps", log_every_n_steps)
        self._sample_every_n_steps: int | None = None
        self._cadence: Cadence | None = None
        self.loss = LossWindow()
        # what the detectors read besides the monitors' statistics (lightning_watch/alerts/probes.py)
        self.inputs, self.outputs, self.labels = InputProbe(), OutputProbe(), LabelProbe()
        self.hygiene, self.symmetry = GradientHygiene(), UnitSymmetry()
        self.trend, self.facts = LossTrend(), ModelFacts()  # the loss's slope; dropout rates, frozen layers
        self.gates = RecurrentGates()  # saturation inside nn.LSTM/GRU/RNN
        self.val_inputs = ValidationInputs()  # the scale of the validation inputs, next to the training ones
        self.engine = AlertEngine(self.config, initial_loss=self.loss.current_initial_loss)
        self.stop_alert: Alert | None = None
        self._agreement = ActionAgreement()
        self._flags: ActionFlags | None = None
        self._agreeing = False  # this fit runs under DDP with a "stop"/"raise" action
        self._bundled = False  # True when a Watch drives this engine
        self._own = MonitorBundle([])  # used alone: the monitors built here
        self._inert = False  # used alone next to a Watch with alerts of its own: does nothing
        self._pending_state: dict[str, Any] | None = None  # a checkpoint, applied at fit start
        self._hooks = HookSubscription(self)  # used alone: which of its hooks Lightning calls
        self._quiet, self._plain = QuietSteps(), False  # the fast path when used alone
        self._fresh()

    def _fresh(self) -> None:
        self.stop_alert = None
        self._checked = False
        self._recorder: ForwardRecorder | None = None
        self._labels = LabelRunCheck(self.config.label_batches)
        self._agreement.clear()
        self._sinks = AlertSinks()
        self._warnings = FrameworkWarnings()
        self._backward_losses: list = []  # this batch's losses as Lightning backpropagates them
        self._automatic = True  # the module's optimization mode (read at fit start)
        self._compiled = False  # whether the module runs through torch.compile (read at fit start)
        self._sampled = self._logging = False

    # ------------------------------------------------------------------ public face
    @property
    def alerts(self) -> list[Alert]:
        """The alerts raised in this fit, in order."""
        return self.engine.alerts

    @property
    def actions(self) -> dict[str, str]:
        return self.config.actions

    @property
    def settings(self) -> dict[str, dict[str, Any]]:
        return self.config.settings

    @property
    def disabled(self) -> set[str]:
        return self.config.disabled

    def _state_fields(self) -> dict[str, Any]:
        return {"actions": self.config.actions, "disabled": sorted(self.config.disabled)}

    @property
    def _passive(self) -> bool:
        # a Watch drives this engine, or another engine judges this Trainer: the Lightning hooks do nothing
        return self._bundled or self._inert

    @property
    def cadence(self) -> Cadence | None:
        """When the loss window and the probes sample and are read (``None`` before ``setup``)."""
        return self._cadence

    def bind(self, log_every_n_steps: int | None, sample_every_n_steps: int | None) -> None:
        """Called by a ``Watch`` that drives this engine: its cadence arguments apply to the loss window."""
        if self._bundled:
            raise ValueError("`alerts` must be an EarlyAlerts not already used by another Watch.")
        self._bundled = True
        self._log_every_n_steps = log_every_n_steps
        self._sample_every_n_steps = sample_every_n_steps

    # ------------------------------------------------------------------ engine steps (Watch drives them)
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a new fit (``setup``)."""
        self._fresh()
        self.engine.reset()
        self.loss.clear()  # a Watch fitted again must not compare new losses with the last fit's
        self._cadence = Cadence.resolve(trainer, self._log_every_n_steps, self._sample_every_n_steps)
        self._agreeing = trainer.world_size > 1 and self.config.may_stop_or_raise

    def sources(self) -> list[StatSource]:
        """What the hub reads for this engine: the loss window, the probes (and the DDP action flags)."""
        flags = [self._flags] if self._flags is not None else []
        # the label probe after the output probe: it reads the number of classes the outputs tell
        probes = [self.inputs, self.outputs, self.labels, self.hygiene, self.symmetry, self.trend, self.facts]
        probes += [self.gates, self.val_inputs]
        return [self.loss, *probes, *flags]

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The model is on its device (``on_fit_start``)."""
        self._sinks.start(trainer)
        pending, self._pending_state = self._pending_state, None
        if pending:
            self._load(pending)  # before the loss window allocates: it applies its part then
        device = pl_module.device
        # known once per fit (Lightning compiles before it): each test walks every module, and logging steps ask
        self._compiled = is_compiled(pl_module)
        # Lightning hands the loss of an accumulating batch already divided by `accumulate_grad_batches`
        self._automatic = pl_module.automatic_optimization
        accumulating = self._automatic and trainer.accumulate_grad_batches > 1
        self.loss.start(self._cadence, device, scale=trainer.accumulate_grad_batches if accumulating else 1.0)
        # a probe runs only if an enabled detector reads what it measures (the rules declare `requires`)
        needed = required_metrics((*BUILTIN_RULES, *self.config.rules), self.config.disabled)
        starts = {
            self.inputs: lambda: self.inputs.start(self._cadence, device),
            self.outputs: lambda: self.outputs.start(self._cadence, device),
            self.labels: lambda: self.labels.start(self._cadence, device),
            self.hygiene: lambda: self.hygiene.start(
                self._cadence, device, pl_module, trainer.optimizers, automatic=self._automatic
            ),
            self.symmetry: lambda: self.symmetry.start(self._cadence, device, pl_module),
            self.trend: lambda: self.trend.start(self._cadence, device),
            self.facts: lambda: self.facts.start(self._cadence, device, pl_module),
            self.gates: lambda: self.gates.start(self._cadence, device, pl_module),
            self.val_inputs: lambda: self.val_inputs.start(self._cadence, device),
        }
        self.facts.stop()
        for probe, start in starts.items():
            probe.state.clear()  # not allocated: a probe that does not start measures nothing
            if needed & set(probe.PRODUCES):
                start()
        self._flags = ActionFlags(self._agreement, device) if self._agreeing else None

    def train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        at = _now(trainer)
        ctx = self.engine.context()
        found = []
        if self.config.enabled("unshuffled_data"):
            found += check_sampler(ctx, at, trainer.train_dataloader)
        if self.config.enabled("unseeded_run"):
            found += check_seed(ctx, at, accelerated=pl_module.device.type != "cpu")
        if self.config.enabled("frozen_parameters"):
            found += check_frozen(ctx, at, pl_module)
        self._handle(trainer, self.engine.record(found))

    @property
    def _warning_batches(self) -> int:
        """The first batches whose framework warnings become alerts."""
        return self.config.settings["framework_warning"]["batches"]

    def next_busy(self, step: int) -> int:
        """The first step ``>= step`` at which a batch needs more than :meth:`record_loss` (and, under
        manual optimization, :meth:`before_backward`): a sampled step, or one of the first batches,
        which the one-time checks read. ``Watch`` skips every other hook of this engine before it."""
        if self._cadence is None:
            return NEVER
        if (
            not self._checked
            or self._recorder is not None
            or self._warnings.listening
            or (step < self._warning_batches and self.config.enabled("framework_warning"))
            or (not self._labels.done and self.config.enabled("unshuffled_data"))
        ):
            return step
        return self._cadence.next_sample_step(step)

    def begin_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        step = logging_step(trainer)
        self._sampled = self._cadence.is_sample_step(step)
        self._logging = self._cadence.is_log_step(step)
        if self._sampled:
            self.labels.observe(batch)
        if self._logging:  # one batch per window tells the scale of inputs and outputs: the logging one
            self.inputs.observe(batch)
            if not self._compiled:  # new hooks would make torch.compile recompile
                self.outputs.arm(pl_module)
                self.gates.arm()
        if step < self._warning_batches and self.config.enabled("framework_warning"):
            self._warnings.listen()
        if not self._labels.done and self.config.enabled("unshuffled_data"):
            self._labels.observe(batch)
            if self._labels.done:
                self._handle(trainer, self.engine.record(self._labels.result(self.engine.context(), _now(trainer))))
        if self._checked:
            return
        self._checked = True
        if self._compiled:
            return  # an extra eval-mode forward and new hooks would make torch.compile recompile
        if self.config.enabled("batch_mixing"):
            found = check_batch_mixing(self.engine.context(), _now(trainer), pl_module, batch)
            self._handle(trainer, self.engine.record(found))
        # the real first training forward tells the module order and what BatchNorm layers see
        self._recorder = ForwardRecorder(pl_module)

    def before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        """Lightning is about to backpropagate ``loss`` (both optimization modes)."""
        # checked, and judged, on logging steps: one batch per window suffices for an invariant
        self.hygiene.before_backward(self._logging, trainer.global_step if self._automatic else 0)
        self.record_backward(loss)

    @property
    def records_backward(self) -> bool:
        """Whether :meth:`record_backward` does anything (manual optimization): a quiet automatic batch skips it."""
        return not self._automatic

    def record_backward(self, loss: Any) -> None:
        """A quiet batch's backward: keep the value of a manual ``training_step``'s loss (not its graph)."""
        if not self._automatic:
            self._backward_losses.append(loss.detach())

    def before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._logging:
            self.hygiene.before_optimizer_step(optimizer)

    def end_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        if self._logging:
            self.outputs.measure()
            self.gates.disarm()
        self.hygiene.end_batch()
        if self._warnings.listening and (self._warnings.seen or logging_step(trainer) + 1 >= self._warning_batches):
            self._warnings.stop()
            found = self._warnings.alerts(self.engine.context(), _now(trainer))
            if found:
                self._handle(trainer, self.engine.record(found))
        if self._recorder is not None:
            self._recorder.remove()
            self.engine.forward_order = self._recorder.order
            if self.config.enabled("small_batch_norm"):
                found = check_batch_norm(
                    self.engine.context(), _now(trainer), self._recorder.batch_norm, trainer.world_size
                )
                self._handle(trainer, self.engine.record(found))
            self._recorder = None
        self.record_loss(trainer, pl_module, outputs, fold=self._sampled or self._logging)

    def record_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, fold: bool = False) -> bool:
        """The part of a batch's end that runs on every batch: the loss is kept for its window (no
        kernel, no read). With ``fold`` (sampled and logging steps) the kept losses join the window
        and the non-finite check looks at them, without a host sync.

        Returns whether an alert was raised (a non-finite loss).
        """
        loss = self.keep_loss(outputs)
        return fold and self._fold(trainer, loss)

    def keep_loss(self, outputs: Any) -> Any:
        """A quiet batch's end (``record_loss`` without ``fold``): keep its loss; returns it (or ``None``)."""
        if self._automatic and type(outputs) is dict:
            # automatic optimization: Lightning checked that the loss it backpropagated is a scalar float
            # tensor, and hands it over detached; keeping it touches nothing else (every batch pays this)
            loss = outputs.get("loss")
            if loss is not None:
                self.loss.keep(loss)
            return loss
        loss = extract_loss(outputs)
        backward = self._backward_losses
        if backward:
            if loss is None and len(backward) == 1:
                # manual optimization whose `training_step` returns nothing: the one loss it backpropagated
                # (several backwards in a batch are several objectives, a GAN's: none of them is "the" loss)
                loss = extract_loss(backward[0])
            backward.clear()
        if loss is not None:
            self.loss.add(loss)
        return loss

    def _fold(self, trainer: pl.Trainer, loss: Any) -> bool:
        """A sampled step: the kept losses join the window, this one the trend; a non-finite one is an alert."""
        if loss is not None:  # the loss's trend: sampled steps only, device ops, no sync
            self.trend.observe(logging_step(trainer), loss.detach())
        if not (self.loss.fold() and self.config.enabled("non_finite_loss")):
            return False
        alert = self.engine.context().alert(
            "non_finite_loss",
            _now(trainer),
            None,
            1.0,
            self.config.settings["non_finite_loss"]["threshold"],
            "The training loss became NaN or infinite.",
            "Lower the learning rate, enable gradient clipping (`Trainer(gradient_clip_val=1.0)`), and look for "
            "log/division of zero or an overflow in the loss.",
            severity="error",
        )
        self._handle(trainer, self.engine.record([alert]))
        return True

    def validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A validation run begins (not the sanity check): its first batch's inputs are measured."""
        if not trainer.sanity_checking and not self._compiled:
            self.val_inputs.arm(pl_module)

    def validation_end(self) -> None:
        self.val_inputs.disarm()

    def on_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: Snapshot) -> None:
        """A publication of the hub: judge it, then act on what this read agreed."""
        self._handle(trainer, self.engine.evaluate(snapshot, final=snapshot.final))
        for action, alert in self._agreement.take_agreed():
            self._act(
                trainer,
                action,
                alert or remote_alert(logging_step(trainer), trainer.current_epoch, trainer.global_rank),
            )

    def stop(self, trainer: pl.Trainer) -> None:
        """End of fit: remove what is on the model; agree a late "raise" (``teardown``)."""
        self.abort()
        pending = self._agreement.take_unsent()
        if not (self._agreeing and self.config.may_raise):
            return  # a pending "stop" needs nothing: the fit is over on every rank
        if trainer.strategy.reduce_boolean_decision("raise" in pending, all=False):
            remote = remote_alert(logging_step(trainer), trainer.current_epoch, trainer.global_rank)
            self._act(trainer, "raise", pending.get("raise") or remote)

    def abort(self) -> None:
        """Remove everything this engine put on the model (also after an exception)."""
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
        self._warnings.stop()
        self.outputs.disarm()
        self.gates.disarm()
        self.val_inputs.disarm()
        self.hygiene.stop()
        self.loss.stop()

    # ------------------------------------------------------------------ decisions
    def _handle(self, trainer: pl.Trainer, findings: Sequence[Finding]) -> None:
        for finding in findings:
            self._sinks.emit(trainer, finding.alert)
            if finding.action == "warn":
                continue
            if not finding.shared and trainer.world_size > 1:
                # a rank-local finding acts when the next read has told every rank: acting alone
                # would stop or fail one rank while the others wait
                self._agreement.defer(finding.action, finding.alert)
                continue
            self._act(trainer, finding.action, finding.alert)

    def _act(self, trainer: pl.Trainer, action: str, alert: Alert) -> None:
        if action == "raise":
            raise AlertError(alert)
        if self.stop_alert is None:
            self.stop_alert = alert
            say(f"lightning_watch stops training because of {alert.code}: {alert.message}", AlertWarning)
        trainer.should_stop = True

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = {
            **self.engine.state_dict(),
            "labels_done": self._labels.done,
            "loss": self.loss.state_dict(),
        }
        if not self._bundled:
            state["monitors"] = {type(m).__name__: m.state_dict() for m in self._own.monitors}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied at fit start (Lightning restores callbacks after `setup`, which starts a fresh fit)
        self._pending_state = dict(state_dict) if state_dict else None
        for monitor in self._own.monitors:
            saved = (state_dict or {}).get("monitors", {}).get(type(monitor).__name__)
            if saved:
                monitor.load_state_dict(saved)

    def _load(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)
        if state.get("loss"):
            self.loss.load_state_dict(state["loss"])
        if state.get("labels_done"):
            self._labels.seen = self._labels.batches

    # ------------------------------------------------------------------ Lightning hooks (used alone)
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._bundled:
            raise ValueError(
                "`EarlyAlerts` must be passed either to `Watch(alerts=...)` or to the Trainer's callbacks, not both."
            )
        if stage != "fit":
            return
        present, other = _families_measured_by_others(trainer, self)
        self._inert = other is not None
        if self._inert:
            rank_zero_warn(
                f"EarlyAlerts is in the Trainer's callbacks next to a {type(other).__name__} that has alerts of its "
                "own: every alert would be raised twice, so this EarlyAlerts does nothing. Configure that one instead "
                "(`Watch(alerts=EarlyAlerts(...))`), or pass `Watch(alerts=False)`.",
                category=WatchWarning,
            )
            return
        self._own = MonitorBundle(
            [cls(log_every_n_steps=self._log_every_n_steps) for cls in FAMILIES.values() if cls not in present]
        )
        self._own.prepare(trainer, pl_module)
        self.prepare(trainer, pl_module)
        hub = StatHub.for_trainer(trainer)
        hub.listen(self.on_snapshot)
        self._hub = hub

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._passive:
            return
        self._own.start(trainer, pl_module)
        self.start(trainer, pl_module)
        self._hub.join(self, [*self._own.monitors, *self.sources()])
        keep = ("on_train_batch_end", "on_before_backward") if self.records_backward else ("on_train_batch_end",)
        self._quiet, self._plain = QuietSteps(self._hooks, keep), False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._passive:
            self.train_start(trainer, pl_module)

    # used alone, the same fast path as `Watch`: before the next step anything is due at, a batch
    # costs one comparison and its loss is only kept
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._passive:
            return
        self._plain = self._quiet.quiet(trainer)
        if self._plain:
            return
        self.begin_batch(trainer, pl_module, batch)  # first: its one-time checks run before any hook is armed
        self._own.begin_batch(logging_step(trainer))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self._passive:
            return
        if not self._plain:
            self.before_backward(trainer, pl_module, loss)
        else:
            self.record_backward(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not (self._passive or self._plain):
            self.before_optimizer_step(trainer, pl_module, optimizer)
            self._own.before_optimizer_step(trainer, pl_module, optimizer, logging_step(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._passive:
            return
        if self._plain:
            self.keep_loss(outputs)
            self._quiet.plain_end(trainer)
            return
        self.end_batch(trainer, pl_module, outputs)
        stepped = steps_optimizer(trainer)
        step = logging_step(trainer)
        self._own.end_batch(trainer, pl_module, stepped, step)
        if stepped:
            self._hub.batch_end(self, trainer, pl_module)
            self._plain = self._quiet.after(step, self._own.next_busy, self._hub.next_due, self.next_busy)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._passive:
            self.validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._passive:
            self.validation_end()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._passive:
            self._hub.flush(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._passive:
            return
        self._leave(trainer)
        self.stop(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no `teardown` after an exception: without this the monitors' hooks
        # (forward hooks, optimizer step hooks) would stay on the user's model and optimizer
        if self._passive:
            return
        self._leave(trainer)
        self.abort()
        self._agreement.clear()

    def _leave(self, trainer: pl.Trainer) -> None:
        self._hooks.stop()
        self._own.stop()
        hub = StatHub.for_trainer(trainer)
        hub.unlisten(self.on_snapshot)
        hub.leave(self)


def _families_measured_by_others(trainer: pl.Trainer, me: EarlyAlerts) -> tuple[set[type[WatchMonitor]], Any]:
    """Monitor families another callback of the Trainer measures, and a callback with alerts of its own."""
    present: set[type[WatchMonitor]] = set()
    other = None
    for callback in trainer.callbacks:
        monitors = [callback] if isinstance(callback, WatchMonitor) else list(getattr(callback, "monitors", ()))
        for monitor in monitors:
            present.update(cls for cls in FAMILIES.values() if isinstance(monitor, cls))
        engine = getattr(callback, "early_alerts", None)
        if engine is not None and engine is not me:
            other = callback
    return present, other


def _now(trainer: pl.Trainer) -> Snapshot:
    return Snapshot(step=logging_step(trainer), epoch=trainer.current_epoch)
