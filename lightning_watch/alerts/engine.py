"""``EarlyAlerts``: turns the logging-step snapshots and the loss into diagnoses, once each."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_watch.alerts.alert import CODES, Alert, AlertError, severity_rank
from lightning_watch.alerts.checks import (
    ForwardRecorder,
    LabelRunCheck,
    check_batch_mixing,
    check_batch_norm,
    check_sampler,
    check_seed,
)
from lightning_watch.alerts.loss import LossMonitor, NonFiniteGuard, extract_loss
from lightning_watch.alerts.rules import BUILTIN_RULES, DEFAULTS, Rule, RuleContext
from lightning_watch.alerts.sinks import AlertSinks
from lightning_watch.cadence import check_interval, logging_step
from lightning_watch.monitors._base import WatchMonitor
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock
from lightning_watch.warn import warn_once

if TYPE_CHECKING:
    from lightning_watch.watch import Watch

log = logging.getLogger("lightning_watch.alerts")

#: what a raised alert may do, per code
ACTIONS = ("warn", "stop", "raise")

#: codes whose evidence gets worse as it gets smaller
LOWER_IS_WORSE = frozenset({"vanishing_gradients", "tiny_updates", "loss_plateau"})

#: an alert is cleared after this many rule evaluations without it
CLEAR_AFTER = 2

#: an active alert is raised again when its evidence moves this factor further past the threshold
WORSE_FACTOR = 10.0

_NON_FINITE = frozenset({"non_finite_loss", "non_finite_gradients"})

#: settings that count steps or batches (positive integers); every other setting is a non-negative number
_INTEGER_SETTINGS = frozenset({"patience", "min_steps"})


@dataclass
class _Active:
    severity: str
    value: float
    absent: int = 0
    cleared: bool = False


class EarlyAlerts(Callback):
    """Tells you, early and in plain words, that training is sick, and what to try.

    Rules run on the statistics snapshot of each logging step (no host sync of their own); a
    cheap guard watches the loss every step for NaN/Inf; one-time checks run at the start of
    fit (data order, batch mixing, BatchNorm batch size, seeding). Each alert is raised once per
    code and module, and again only if it gets worse (higher severity, or evidence ten times
    further past its threshold) or comes back after clearing (absent for two evaluations).

    ``Watch()`` includes an ``EarlyAlerts`` by default (``Watch(alerts=EarlyAlerts(...))`` to
    configure it). Used alone, ``EarlyAlerts`` builds a private :class:`~lightning_watch.Watch`
    for its statistics (which then also writes the ``watch/*`` scalars); a family already measured
    by a standalone monitor in the Trainer's callbacks (``[GradientNormMonitor(), EarlyAlerts()]``)
    is not built again: the rules read that monitor's own values, and every point is written once.
    Do not combine it with a ``Watch`` in the same Trainer; configure the Watch's alerts instead.

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
        log_every_n_steps: cadence of the private Watch when used alone (``None``: the Trainer's, at least 10).

    Raises:
        ValueError: for an unknown code, action or setting name, a negative threshold, or a
            patience that is not a positive integer.

    Logged Metrics:
        - ``watch/global/loss``, ``watch/global/loss_min``, ``watch/global/loss_max``,
          ``watch/global/loss_nonfinite``: the training loss over each logging window.
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
        self.user_rules = list(_check_rules(rules))
        known = list(CODES) + [c for rule in self.user_rules for c in getattr(rule, "codes", ())]
        self.default_action = _check_action("default_action", default_action)
        self.actions = {
            _check_code("actions", c, known): _check_action(f"actions[{c!r}]", a) for c, a in (actions or {}).items()
        }
        self.settings, self.disabled = _merge_settings(settings or {}, known)
        self.label_batches = check_interval("label_batches", label_batches, allow_none=False)
        self.history_size = check_interval("history", history, allow_none=False)
        self._log_every_n_steps = check_interval("log_every_n_steps", log_every_n_steps)
        chosen = {*self.actions.values(), self.default_action}
        self._agrees = bool(chosen & {"stop", "raise"})
        self._may_raise = "raise" in chosen
        self._owner: Watch | None = None  # the Watch that feeds this engine
        self._private = False  # True when the owner is a Watch built here
        self._own_monitors: list[WatchMonitor] = []  # the private Watch's monitors, all families
        self._adopted: list[WatchMonitor] = []  # the user's standalone monitors read instead (used alone)
        self._loss: LossMonitor | None = None
        self._flags = _ActionFlags(self)
        self._agreeing = False  # this fit runs under DDP with a "stop"/"raise" action
        self._pending_state: dict[str, Any] | None = None
        self._fresh()

    def _fresh(self) -> None:
        self.alerts: list[Alert] = []
        self.stop_alert: Alert | None = None
        self._active: dict[tuple[str, str | None], _Active] = {}
        self._history: deque[Snapshot] = deque(maxlen=self.history_size)
        self._forward_order: list[str] = []
        self._checked = False
        self._recorder: ForwardRecorder | None = None
        self._labels = LabelRunCheck(self.label_batches)
        self._guard = NonFiniteGuard()
        # rank-local "stop"/"raise" decisions under DDP: found, then in the current read, then agreed
        self._pending: dict[str, Alert] = {}
        self._sent: dict[str, Alert] = {}
        self._agreed: set[str] = set()
        self._parts: list[Snapshot] = []  # publications of this logging step (adopted monitors)
        self._sinks = AlertSinks()

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(actions=self.actions, disabled=sorted(self.disabled))
        return key

    # ------------------------------------------------------------------ wiring to a Watch
    def _attach(self, watch: Watch, log_every_n_steps: int | None, sample_every_n_steps: int | None) -> None:
        """Called by ``Watch``: add the loss monitor to its read and listen to its snapshots."""
        if self._owner is not None:
            raise ValueError("`alerts` must be an EarlyAlerts not already used by another Watch.")
        self._owner = watch
        self._loss = LossMonitor(log_every_n_steps=log_every_n_steps, sample_every_n_steps=sample_every_n_steps)
        self._loss._managed = True  # published by the Watch, in its one read
        watch.add_listener(self._on_snapshot)

    def _due_monitors(self, step: int) -> list[Any]:
        """Monitors of this engine that the Watch must read at ``step``.

        Under DDP with a "stop"/"raise" action, the pending actions join every read the Watch
        makes anyway (and never cause one): that read is their agreement.
        """
        loss = self._loss
        due: list[Any] = []
        if loss is not None and loss._cadence is not None and loss._cadence.is_log_step(step):
            due.append(loss)
        if self._agreeing and (due or any(m._cadence.is_log_step(step) for m in self._owner.monitors)):
            due.append(self._flags)
        return due

    def _owned(self, trainer: pl.Trainer) -> Watch | None:
        """The private Watch when used alone (built on first use), else ``None``."""
        if self._owner is None:
            from lightning_watch.watch import Watch  # the Watch imports this module

            Watch(alerts=self, log_every_n_steps=self._log_every_n_steps)
            self._private = True
            self._own_monitors = list(self._owner.monitors)
        if not self._private:
            raise ValueError(
                "`EarlyAlerts` must be passed either to `Watch(alerts=...)` or to the Trainer's callbacks, not both."
            )
        return self._owner

    # ------------------------------------------------------------------ Lightning hooks (used alone)
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        watch = self._owned(trainer)
        if stage == "fit":
            self._adopt(trainer)
        watch.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._owned(trainer).on_fit_start(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._owned(trainer).on_train_start(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._owned(trainer).on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._owned(trainer).on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._owned(trainer).on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()
        self._owned(trainer).teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no `teardown` after an exception: without this the private Watch's hooks
        # (forward hooks, optimizer step hooks) would stay on the user's model and optimizer
        if not self._private:
            return  # not set up (or shared with a Watch, which cleans up after itself)
        self._release()
        for monitor in self._owner.monitors:
            monitor.on_exception(trainer, pl_module, exception)
        self._on_exception(trainer, pl_module, exception)

    def state_dict(self) -> dict[str, Any]:
        return self._owner.state_dict() if self._private else self._engine_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._private:
            self._owner.load_state_dict(state_dict)
        else:
            self._load_engine_state(state_dict)

    def _adopt(self, trainer: pl.Trainer) -> None:
        """Used alone: read the user's standalone monitors instead of measuring their families twice.

        ``[GradientNormMonitor(), EarlyAlerts()]`` would otherwise measure gradients twice and
        write every ``watch/grad_*`` point twice (same tags, same steps). The private Watch leaves
        such a family out for this fit; the monitor keeps measuring and writing as configured, and
        the rules see its snapshot merged with the private Watch's one of the same logging step.
        """
        self._release()
        families = tuple(type(m) for m in self._own_monitors)
        # a monitor bundled in a Watch is published by that Watch: only standalone ones are adopted
        self._adopted = [cb for cb in trainer.callbacks if isinstance(cb, families) and not cb._managed]
        self._owner.monitors = [m for m in self._own_monitors if not any(isinstance(a, type(m)) for a in self._adopted)]
        for monitor in self._adopted:
            monitor.add_listener(self._on_snapshot)

    def _release(self) -> None:
        """Stop listening to adopted monitors."""
        for monitor in self._adopted:
            if self._on_snapshot in monitor._listeners:
                monitor._listeners.remove(self._on_snapshot)
        self._adopted = []

    # ------------------------------------------------------------------ engine hooks (called by Watch)
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fresh()
            self._loss.setup(trainer, pl_module, stage)
            self._agreeing = trainer.world_size > 1 and self._agrees

    def _on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sinks.start(trainer)
        self._loss.on_fit_start(trainer, pl_module)
        if self._pending_state is not None:
            self._load_engine_state(self._pending_state)

    def _on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        at = self._now(trainer)
        ctx = self._context()
        found = []
        if self._enabled("unshuffled_data"):
            found += check_sampler(ctx, at, trainer.train_dataloader)
        if self._enabled("unseeded_run"):
            found += check_seed(ctx, at, accelerated=pl_module.device.type != "cpu")
        self._process(trainer, found)

    def _on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._labels.done and self._enabled("unshuffled_data"):
            self._labels.observe(batch)
            if self._labels.done:
                self._process(trainer, self._labels.result(self._context(), self._now(trainer)))
        if self._checked:
            return
        self._checked = True
        if _compiled(pl_module):
            return  # an extra eval-mode forward and new hooks would make torch.compile recompile
        if self._enabled("batch_mixing"):
            self._process(trainer, check_batch_mixing(self._context(), self._now(trainer), pl_module, batch))
        # the real first training forward tells the module order and what BatchNorm layers see
        self._recorder = ForwardRecorder(pl_module)

    def _on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._forward_order = self._recorder.order
            if self._enabled("small_batch_norm"):
                found = check_batch_norm(
                    self._context(), self._now(trainer), self._recorder.batch_norm, trainer.world_size
                )
                self._process(trainer, found)
            self._recorder = None
        loss = extract_loss(outputs, trainer, pl_module)
        if loss is None or self._loss is None:
            return
        self._loss.add(loss)
        if self._guard.push(loss) and self._enabled("non_finite_loss"):
            at = self._now(trainer)
            alert = self._context().alert(
                "non_finite_loss",
                at,
                None,
                1.0,
                self.settings["non_finite_loss"]["threshold"],
                "The training loss became NaN or infinite.",
                "Lower the learning rate, enable gradient clipping (`Trainer(gradient_clip_val=1.0)`), and look for "
                "log/division of zero or an overflow in the loss.",
                severity="error",
            )
            self._process(trainer, [alert])

    def _on_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: Snapshot) -> None:
        """A publication of the owner Watch, or of an adopted monitor (used alone)."""
        if not self._adopted:
            self._evaluate(trainer, snapshot)
            return
        # Every source publishes in the same `on_train_batch_end` round, in callback order: the
        # rules run once the last one due at this step has published, on the merged snapshot.
        if self._parts and self._parts[0].step != snapshot.step:  # a source did not publish: never wait past a step
            parts, self._parts = self._parts, []
            self._evaluate(trainer, _merge(parts))
        self._parts.append(snapshot)
        if len(self._parts) >= self._sources_due(snapshot.step):
            parts, self._parts = self._parts, []
            self._evaluate(trainer, _merge(parts))

    def _sources_due(self, step: int) -> int:
        """Number of publications at logging step ``step``: the owner's, and each adopted monitor's."""
        owner = any(m._cadence.is_log_step(step) for m in self._owner.monitors) or bool(self._due_monitors(step))
        return int(owner) + sum(m._cadence.is_log_step(step) for m in self._adopted)

    def _evaluate(self, trainer: pl.Trainer, snapshot: Snapshot) -> None:
        ctx = self._context()
        found: list[Alert] = []
        shared: list[Alert] = []
        covered: set[str] = set()
        # once values are NaN/Inf every other statistic is garbage (a NaN gradient row looks "dead")
        broken = snapshot.get("loss_nonfinite", default=0.0) > 0 or snapshot.get("grad_nonfinite", default=0.0) > 0
        for rule in (*BUILTIN_RULES, *self.user_rules):
            codes = [c for c in getattr(rule, "codes", ()) if c not in self.disabled]
            if rule in BUILTIN_RULES and (not codes or (broken and not set(codes) & _NON_FINITE)):
                continue
            try:
                produced = [a for a in rule(snapshot, ctx) if a.code not in self.disabled]
            except Exception as err:  # a broken rule must not break training
                warn_once(("alert-rule", id(rule)), f"Alert rule {rule!r} failed and is skipped: {err!r}")
                continue
            covered.update(codes)
            found += produced
            if rule in BUILTIN_RULES:
                # The same reduced snapshot and the same rule state on every rank: every rank makes
                # the same finding and may act on it now. (The loss guard's rank-local
                # `non_finite_loss` shares its key with the rule; a rank where the guard fired first
                # sent its action in this read or an earlier one, so the ranks still act together.)
                shared += produced
        self._process(trainer, found, covered, shared=shared)
        self._history.append(snapshot)
        # the actions this step's read agreed on (rank-local findings made before the read)
        agreed, self._agreed = self._agreed, set()
        sent, self._sent = self._sent, {}
        for action in ("raise", "stop"):
            if action in agreed:
                self._act(trainer, action, sent.get(action) or _elsewhere(trainer))

    def _teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._cleanup(trainer, pl_module, stage)
        if stage == "fit":
            self._agree_at_end(trainer)

    def _on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove everything this engine put on the model (Lightning calls no teardown after an exception)."""
        self._cleanup(trainer, pl_module)
        self._pending, self._sent, self._agreed = {}, {}, set()

    def _cleanup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str = "fit") -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
        self._guard.clear()
        self._parts = []
        if self._loss is not None:
            self._loss.teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ decisions
    def _process(
        self,
        trainer: pl.Trainer,
        found: Iterable[Alert],
        covered: Iterable[str] = (),
        shared: Iterable[Alert] = (),
    ) -> None:
        """Raise what is new (or worse, or back); ``shared``: the findings every rank makes alike."""
        shared_ids = {id(alert) for alert in shared}
        present = set()
        for alert in found:
            present.add(alert.key)
            state = self._active.get(alert.key)
            if state is None or state.cleared or _worse(alert, state):
                self._active[alert.key] = _Active(alert.severity, alert.value)
                self._raise(trainer, alert, local=id(alert) not in shared_ids)
            else:
                state.absent = 0
        covered = set(covered)
        for key, state in self._active.items():
            if key[0] in covered and key not in present and not state.cleared:
                state.absent += 1
                state.cleared = state.absent >= CLEAR_AFTER

    def _raise(self, trainer: pl.Trainer, alert: Alert, local: bool = True) -> None:
        self.alerts.append(alert)
        self._sinks.emit(trainer, alert)
        action = self.actions.get(alert.code, self.default_action)
        if action == "warn":
            return
        if local and trainer.world_size > 1:
            # a rank-local finding (checks, the loss guard, user rules) acts when the next read
            # has told every rank: acting alone would stop or fail one rank while the others wait
            self._pending.setdefault(action, alert)
            return
        self._act(trainer, action, alert)

    def _send_actions(self) -> list[float]:
        """The pending actions, as the flags this rank contributes to the current read."""
        for action, alert in self._pending.items():
            self._sent.setdefault(action, alert)
        self._pending = {}
        return [float(action in self._sent) for action in _ActionFlags.ACTIONS]

    def _agree_at_end(self, trainer: pl.Trainer) -> None:
        """A "raise" found after the last read of the fit: agreed by one collective per fit."""
        pending = {**self._pending, **self._sent}
        self._pending, self._sent, self._agreed = {}, {}, set()
        if not (self._agreeing and self._may_raise):
            return  # a pending "stop" needs nothing: the fit is over on every rank
        if trainer.strategy.reduce_boolean_decision("raise" in pending, all=False):
            self._act(trainer, "raise", pending.get("raise") or _elsewhere(trainer))

    def _act(self, trainer: pl.Trainer, action: str, alert: Alert) -> None:
        if action == "raise":
            raise AlertError(alert)
        if self.stop_alert is None:
            self.stop_alert = alert
            log.warning("Stopping training because of %s.", alert.code)
        trainer.should_stop = True

    # ------------------------------------------------------------------ helpers
    def _enabled(self, code: str) -> bool:
        return code not in self.disabled

    def _context(self) -> RuleContext:
        initial = self._loss.current_initial_loss() if self._loss is not None else math.nan
        return RuleContext(
            history=self._history, forward_order=self._forward_order, initial_loss=initial, settings=self.settings
        )

    @staticmethod
    def _now(trainer: pl.Trainer) -> Snapshot:
        return Snapshot(step=logging_step(trainer), epoch=trainer.current_epoch)

    # ------------------------------------------------------------------ checkpointing
    def _engine_state(self) -> dict[str, Any]:
        return {
            "alerts": [a.to_dict() for a in self.alerts],
            "active": [[code, module, asdict(state)] for (code, module), state in self._active.items()],
            "history": [asdict(s) for s in self._history],
            "forward_order": list(self._forward_order),
            "labels_done": self._labels.done,
            "loss": self._loss.state_dict() if self._loss is not None else {},
        }

    def _load_engine_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._pending_state = None
        self.alerts = [Alert.from_dict(a) for a in state.get("alerts", [])]
        self._active = {(code, module): _Active(**fields) for code, module, fields in state.get("active", [])}
        self._history.clear()
        self._history.extend(Snapshot(**s) for s in state.get("history", []))
        self._forward_order = list(state.get("forward_order", []))
        if self._loss is not None and state.get("loss"):
            self._loss.load_state_dict(state["loss"])
        if state.get("labels_done"):
            self._labels.seen = self._labels.batches


class _ActionFlags:
    """The "stop"/"raise" actions pending on this rank, carried by a logging step's one read (DDP).

    Read like a monitor (``publish`` calls ``_collect``, ``_finalize``, ``_reset``): one
    max-reduced row, so after the read every rank knows whether any rank found a reason to stop
    or raise, and all act on the same step. It only joins reads the Watch makes anyway.
    """

    ACTIONS = ("stop", "raise")
    KEY = "EarlyAlerts.actions"

    def __init__(self, engine: EarlyAlerts) -> None:
        self._engine = engine

    def _collect(self, trainer: pl.Trainer) -> StatBlock:
        engine = self._engine
        block = StatBlock()
        device = engine._loss._device if engine._loss is not None else torch.device("cpu")
        block.add_max(self.KEY, torch.tensor(engine._send_actions(), dtype=torch.float32, device=device))
        return block

    def _finalize(self, values: dict[str, Any], snapshot: Snapshot) -> None:
        flags = values[self.KEY]
        self._engine._agreed = {action for action, flag in zip(self.ACTIONS, flags) if flag > 0}

    def _reset(self) -> None:
        pass


def _merge(parts: Sequence[Snapshot]) -> Snapshot:
    """One snapshot from the publications of one logging step (distinct families)."""
    if len(parts) == 1:
        return parts[0]
    merged = Snapshot(step=parts[0].step, epoch=parts[0].epoch)
    for part in parts:
        for metric, row in part.per_module.items():
            merged.per_module.setdefault(metric, {}).update(row)
        merged.global_.update(part.global_)
    return merged


def _compiled(module: Any) -> bool:
    # one definition for the whole package: a network compiled *inside* the LightningModule counts too
    from lightning_watch.capture import is_compiled

    return is_compiled(module)


def _worse(alert: Alert, state: _Active) -> bool:
    if severity_rank(alert.severity) > severity_rank(state.severity):
        return True
    new, old = abs(alert.value), abs(state.value)
    if not (math.isfinite(new) and math.isfinite(old)) or new == 0 or old == 0:
        return False
    ratio = old / new if alert.code in LOWER_IS_WORSE else new / old
    return ratio >= WORSE_FACTOR


def _elsewhere(trainer: pl.Trainer) -> Alert:
    return Alert(
        code="remote_alert",
        severity="error",
        step=logging_step(trainer),
        epoch=trainer.current_epoch,
        module=None,
        value=math.nan,
        threshold=math.nan,
        message=f"Another process raised an alert (this is rank {trainer.global_rank}).",
        hint="See the alerts of rank zero (alerts.jsonl).",
    )


# ---------------------------------------------------------------------- argument checks
def _check_code(arg: str, code: Any, known: Sequence[str]) -> str:
    if code not in known:
        raise ValueError(f"`{arg}` key must be an alert code, got {code!r}. Valid codes: {', '.join(known)}.")
    return code


def _check_action(arg: str, action: Any) -> str:
    if action not in ACTIONS:
        raise ValueError(f"`{arg}` must be one of {', '.join(map(repr, ACTIONS))}, got {action!r}.")
    return action


def _check_rules(rules: Any) -> list[Rule]:
    if callable(rules) or not isinstance(rules, Iterable):
        rules = [rules]
    rules = list(rules)
    for rule in rules:
        if not callable(rule):
            raise ValueError(f"`rules` must be callables `rule(snapshot, context) -> alerts`, got {rule!r}.")
    return rules


def _merge_settings(user: Mapping[str, Any], known: Sequence[str]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    settings = {code: dict(params) for code, params in DEFAULTS.items()}
    disabled: set[str] = set()
    for code, params in user.items():
        _check_code("settings", code, known)
        if params is False:
            disabled.add(code)
            continue
        if params is True:
            continue
        if not isinstance(params, Mapping):
            raise ValueError(f"`settings[{code!r}]` must be a dict of settings or False, got {params!r}.")
        valid = DEFAULTS.get(code)
        for name, value in params.items():
            arg = f"settings[{code!r}][{name!r}]"
            if valid is not None and name not in valid:
                raise ValueError(f"`{arg}` is not a setting of {code!r}; valid settings: {', '.join(valid)}.")
            if name in _INTEGER_SETTINGS:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"`{arg}` must be a positive integer, got {value!r}.")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"`{arg}` must be a non-negative number, got {value!r}.")
        settings.setdefault(code, {}).update(params)
    return settings, disabled
