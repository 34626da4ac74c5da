"""``EarlyAlerts``: turns the logging-step snapshots and the loss into diagnoses, once each."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
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
from lightning_watch.snapshot import Snapshot
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
    for its statistics (which then also writes the ``watch/*`` scalars): do not combine it with
    a ``Watch`` in the same Trainer; configure the Watch's alerts instead.

    Args:
        actions: ``code -> "warn" | "stop" | "raise"``. ``"stop"`` sets ``trainer.should_stop``
            (agreed by all ranks under DDP, at the next logging step for rank-local findings);
            ``"raise"`` raises :class:`~lightning_watch.alerts.AlertError` carrying the alert.
        settings: ``code -> {name: value}`` overriding :data:`~lightning_watch.alerts.rules.DEFAULTS`
            (``threshold``, ``patience``, ...), or ``code -> False`` to switch a code off.
        rules: extra user rules, ``rule(snapshot, context) -> iterable of Alert`` (see
            :mod:`lightning_watch.alerts.rules`); a ``codes`` attribute on a rule declares its codes.
        default_action: action for codes not in ``actions``.
        label_batches: number of first batches inspected for single-label runs.
        history: number of past snapshots kept for the rules.
        log_every_n_steps: cadence of the private Watch when used alone (``None``: the Trainer's).

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
        self._agrees = any(a in ("stop", "raise") for a in [*self.actions.values(), self.default_action])
        self._owner: Watch | None = None  # the Watch that feeds this engine
        self._private = False  # True when the owner is a Watch built here
        self._loss: LossMonitor | None = None
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
        self._pending: dict[str, Alert] = {}
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

    def _due_monitors(self, step: int) -> list[LossMonitor]:
        """Monitors of this engine that the Watch must read at ``step``."""
        loss = self._loss
        return [loss] if loss is not None and loss._cadence is not None and loss._cadence.is_log_step(step) else []

    def _owned(self, trainer: pl.Trainer) -> Watch | None:
        """The private Watch when used alone (built on first use), else ``None``."""
        if self._owner is None:
            from lightning_watch.watch import Watch  # the Watch imports this module

            Watch(alerts=self, log_every_n_steps=self._log_every_n_steps)
            self._private = True
        if not self._private:
            raise ValueError(
                "`EarlyAlerts` must be passed either to `Watch(alerts=...)` or to the Trainer's callbacks, not both."
            )
        return self._owner

    # ------------------------------------------------------------------ Lightning hooks (used alone)
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._owned(trainer).setup(trainer, pl_module, stage)

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
        self._owned(trainer).teardown(trainer, pl_module, stage)

    def state_dict(self) -> dict[str, Any]:
        return self._owner.state_dict() if self._private else self._engine_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._private:
            self._owner.load_state_dict(state_dict)
        else:
            self._load_engine_state(state_dict)

    # ------------------------------------------------------------------ engine hooks (called by Watch)
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fresh()
            self._loss.setup(trainer, pl_module, stage)

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
        ctx = self._context()
        found: list[Alert] = []
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
        self._process(trainer, found, covered)
        self._history.append(snapshot)
        if trainer.world_size > 1 and self._agrees:
            self._agree(trainer)

    def _teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
        self._guard.clear()
        self._loss.teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ decisions
    def _process(self, trainer: pl.Trainer, found: Iterable[Alert], covered: Iterable[str] = ()) -> None:
        present = set()
        for alert in found:
            present.add(alert.key)
            state = self._active.get(alert.key)
            if state is None or state.cleared or _worse(alert, state):
                self._active[alert.key] = _Active(alert.severity, alert.value)
                self._raise(trainer, alert)
            else:
                state.absent = 0
        covered = set(covered)
        for key, state in self._active.items():
            if key[0] in covered and key not in present and not state.cleared:
                state.absent += 1
                state.cleared = state.absent >= CLEAR_AFTER

    def _raise(self, trainer: pl.Trainer, alert: Alert) -> None:
        self.alerts.append(alert)
        self._sinks.emit(trainer, alert)
        action = self.actions.get(alert.code, self.default_action)
        if action == "warn":
            return
        if trainer.world_size > 1:
            # rank-local findings (checks, the loss guard) are agreed at the next logging step
            self._pending.setdefault(action, alert)
            return
        self._act(trainer, action, alert)

    def _agree(self, trainer: pl.Trainer) -> None:
        # every rank calls the same collectives at the same logging step, whatever it found
        stop = trainer.strategy.reduce_boolean_decision("stop" in self._pending, all=False)
        fail = trainer.strategy.reduce_boolean_decision("raise" in self._pending, all=False)
        pending, self._pending = self._pending, {}
        if fail:
            self._act(trainer, "raise", pending.get("raise") or _elsewhere(trainer))
        if stop:
            self._act(trainer, "stop", pending.get("stop") or _elsewhere(trainer))

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


def _compiled(module: Any) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None or type(module).__name__ == "OptimizedModule"


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
