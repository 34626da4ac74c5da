"""``ActivityRegularizer``: Keras-style activity penalties for any LightningModule, by configuration.

Unlike the monitors, this callback *changes training*: it adds penalties on chosen layers'
outputs to the loss. It is kept apart from the capture engine for that reason: the engine's
hooks detach what they see and run on sampled batches only; these hooks keep the autograd graph
and run on every training forward pass.

How the penalty reaches the loss (see :mod:`lightning_watch.regularize.backward`): forward hooks
compute each penalty on the live output and hold it until Lightning's next backward, which
goes through ``trainer.strategy.backward``; the callback shadows that method on the strategy
instance for the duration of ``fit`` and passes ``closure_loss + penalty`` on (divided by
``accumulate_grad_batches`` under automatic optimization, as Lightning divides the loss). Loss
scaling, ``on_before_backward`` and DDP's single gradient reduction then apply to the total, as
for a hand-written ``loss + penalty``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_watch.cadence import Cadence, check_interval, logging_step, steps_optimizer
from lightning_watch.callback_keys import CachedStateKey
from lightning_watch.hub import SnapshotListener, StatHub
from lightning_watch.regularize.backward import BackwardPatch
from lightning_watch.regularize.rules import (
    ActivityRule,
    OutputSums,
    parse_rules,
    rule_penalty,
    select_output,
)
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock, StateRegistry
from lightning_watch.subscription import HookSubscription
from lightning_watch.warn import warn_once


class ActivityRegularizer(CachedStateKey):
    """Adds activity penalties (penalties on layer outputs) to the training loss of any LightningModule.

    Training with ``ActivityRegularizer({"encoder.fc2": {"l2": 1e-3}})`` gives the gradients
    of a ``training_step`` that returned ``loss + 1e-3 * encoder.fc2(...).pow(2).sum() /
    batch_size``, without editing the module. Semantics, in every mode:

    - Each call of a selected module in a training forward pass (grad enabled) adds its penalty;
      a module called several times per step is penalized every call. Validation, test,
      predict and ``torch.no_grad()`` code add nothing and keep no graph.
    - The penalties computed since the previous backward are added to the next loss Lightning
      backpropagates: the closure's loss under automatic optimization, each
      ``self.manual_backward(loss)`` under manual optimization (so with several optimizers, each
      backward carries the penalties of the forward passes that preceded it).
    - Gradient accumulation: under automatic optimization the penalty is divided by
      ``accumulate_grad_batches`` like the loss. Under manual optimization it is added as is: if
      you divide your loss before ``manual_backward``, scale the rule's ``weight`` alike.
    - Mixed precision: penalties are reduced in float32 and added before the precision plugin
      scales the loss (``16-mixed``), so loss scaling applies to them too.
    - DDP: each process adds its own penalty (its local batch) to its own loss; one backward,
      one gradient all-reduce, as for a hand-written penalty.

    What is *not* changed: whatever your ``training_step`` returns or logs (``train_loss``),
    and Lightning's ``outputs["loss"]`` in ``on_train_batch_end``, exclude the penalty, which is
    logged separately. ``on_before_backward`` hooks receive the total actually backpropagated.
    An optimizer that reads the closure's loss value (``LBFGS``'s line search) sees the loss
    without the penalty while its gradients include it: hand-write the penalty there.

    Layers inside activation checkpointing and modules compiled before ``fit`` are not
    supported (their forward hooks do not run, or run again during backward, where they are
    ignored).

    Args:
        rules: a mapping ``module glob -> {"l1": a, "l2": b, "fn": f, "weight": w,
            "reduction": r, "output": o}`` (any subset with a penalty) or ``module glob ->
            callable`` (``f(output) -> scalar tensor``), an :class:`ActivityRule`, or a list of
            them (rules may also select by module type). Several rules may select one module:
            it gets every one of their penalties. ``weight`` is a constant or a function
            ``step -> weight`` of Lightning's logging step (a warm-up or a decay). Default
            ``reduction`` is Keras': ``sum over elements / batch size``; ``"sum"`` drops the
            division. Tuple outputs (``nn.LSTM``) are penalized on their primary output unless
            ``output`` (an index or a callable) says otherwise.
        log_every_n_steps: interval of the logged penalties and activation scales, in Lightning
            steps; ``None`` follows the Trainer's ``log_every_n_steps``.

    Raises:
        ValueError: at construction, for an unknown key, a negative or non-numeric ``l1``/``l2``/
            ``weight``, a rule without a penalty, or an unknown ``reduction``; at fit start, for
            a rule that selects no module; during training, for a schedule returning a negative
            weight or an ``fn`` returning a non-scalar. All messages name the rule.
        TypeError: during training, when a selected module's output has no floating-point tensor
            (an integer output), naming the rule and the module.

    Logged Metrics:
        - ``watch.activity_penalty/<NN>.<rule>``: the rule's penalty added to the loss, per training
          batch (before the division by ``accumulate_grad_batches``), averaged over the batches
          of the logging window and over processes.
        - ``watch.global/activity_penalty``: the sum over rules.
        - ``watch.activity_rms/<NN>.<module>``: root mean square of each penalized module's output
          (the tensor its first rule penalizes), over every training call in the window.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> warm_up = lambda step: min(1.0, step / 100)
        >>> reg = ActivityRegularizer({"encoder.fc2": {"l2": 1e-3}, "head": {"l1": 1e-4, "weight": warm_up}})
        >>> [rule.name for rule in reg.rules]
        ['encoder.fc2', 'head']
        >>> trainer = Trainer(callbacks=[reg], logger=False)
    """

    METRICS = ("activity_penalty", "activity_rms")
    GLOBAL_METRICS = ("activity_penalty",)

    def __init__(self, rules: Any, log_every_n_steps: int | None = None) -> None:
        self.rules: list[ActivityRule] = parse_rules(rules)
        self._log_every_n_steps = check_interval("log_every_n_steps", log_every_n_steps)
        self._listeners: list[SnapshotListener] = []
        self._hooks = HookSubscription(self)  # which of its per-batch hooks Lightning calls
        self.last_snapshot: Snapshot | None = None
        self.cadence: Cadence | None = None  # StatSource: when the penalties are read
        # per fit
        self._targets: list[tuple[str, nn.Module, tuple[int, ...]]] = []
        self._handles: list[RemovableHandle] = []
        self._patch: BackwardPatch | None = None
        self._strategy: Any = None
        self._automatic = True
        self._active = False  # inside a training batch
        self._weights: list[float] = []
        self._pending: list[Tensor | None] = []  # per rule, with graph, since the last backward
        # logging window, declared per fit: device sums, host counts
        self.state = StateRegistry()

    # ------------------------------------------------------------------ configuration
    def _state_fields(self) -> dict[str, Any]:
        return {"rules": [rule.name for rule in self.rules]}

    @property
    def module_names(self) -> list[str]:
        """Qualified names of the penalized modules, in registration order (during ``fit``)."""
        return [name for name, _, _ in self._targets]

    def add_listener(self, listener: SnapshotListener) -> None:
        """Call ``listener(trainer, pl_module, snapshot)`` after each logging step."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._uninstall()  # a second fit with the same callback starts clean
        targets = self._resolve(pl_module)
        # the penalty is a few scalars computed every step anyway: it follows the Trainer exactly, like the loss
        self.cadence = Cadence.resolve(trainer, self._log_every_n_steps, None, min_inherited_log=1)
        self._automatic = pl_module.automatic_optimization
        self._targets = targets
        self._pending = [None] * len(self.rules)
        self._weights = [0.0] * len(self.rules)
        for index, (_, module, _) in enumerate(targets):
            self._handles.append(module.register_forward_hook(self._make_hook(index)))
        self._strategy = trainer.strategy
        self._patch = BackwardPatch.attach(trainer, self._drain)
        self.state.clear()
        self.state.declare("penalty", (len(self.rules),), reduce="sum")  # summed penalty per rule
        self.state.declare("sum_sq", (len(targets),), reduce="sum")  # squared outputs per module
        # elements per module, then batches: host counts, summed over processes in the read
        self.state.declare("counts", (len(targets) + 1,), reduce="sum", host=True)
        hub = StatHub.for_trainer(trainer)
        hub.join(self, [self])
        for listener in self._listeners:
            hub.listen(listener)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the model is on its final device here (setup runs before it moves)
        self.state.allocate(pl_module.device)
        self._hooks.all()  # the per-batch hooks it does not define are not called

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = logging_step(trainer)
        self._weights = [rule.weight_at(step) for rule in self.rules]  # host floats: no sync
        self._automatic = pl_module.automatic_optimization
        self._active = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._active = False
        if self.state.allocated:
            self.state["counts"][-1] += 1
        if any(term is not None for term in self._pending):
            if not self._automatic:
                warn_once(
                    ("activity-no-backward", id(self)),
                    "ActivityRegularizer computed penalties in a training step that ran no backward through "
                    "Lightning; they were dropped. Under manual optimization call `self.manual_backward(loss)` "
                    "(not `loss.backward()`) so the penalty is added.",
                )
            self._pending = [None] * len(self.rules)  # release the graph
        if steps_optimizer(trainer):
            StatHub.for_trainer(trainer).batch_end(self, trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a batch can end without `on_train_batch_end` (a module's `on_train_batch_start` returning -1)
        self._stop_batch()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_batch()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall()
            StatHub.for_trainer(trainer).leave(self)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call `teardown` on callbacks after an exception: restore the model here
        self._uninstall()
        StatHub.for_trainer(trainer).leave(self)

    # ------------------------------------------------------------------ internals
    def _resolve(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
        chosen: dict[str, tuple[nn.Module, list[int]]] = {}
        for index, rule in enumerate(self.rules):
            try:
                matched = rule.selection.resolve(pl_module, default=lambda module: False)
            except ValueError as err:
                raise ValueError(f"ActivityRegularizer rule {rule.name!r}: {err}") from None
            if not matched:
                raise ValueError(
                    f"ActivityRegularizer rule {rule.name!r} selects no module of {type(pl_module).__name__}: "
                    f"`types` {[t.__name__ for t in rule.selection.types]!r} match nothing "
                    f"(or `exclude` {list(rule.selection.exclude)!r} removes every match)."
                )
            for name, module in matched:
                chosen.setdefault(name, (module, []))[1].append(index)
        order = {name: i for i, (name, _) in enumerate(pl_module.named_modules())}
        return [
            (name, module, tuple(ids)) for name, (module, ids) in sorted(chosen.items(), key=lambda kv: order[kv[0]])
        ]

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._active and torch.is_grad_enabled() and not self._patch.in_backward:
                self._penalize(index, output)

        return hook

    def _penalize(self, index: int, output: Any) -> None:
        name, module, rule_ids = self._targets[index]
        shared: dict[Any, OutputSums] = {}  # rules that penalize the same part share its sums
        first: OutputSums | None = None
        for r in rule_ids:
            rule = self.rules[r]
            key = rule.output if isinstance(rule.output, (int, type(None))) else id(rule.output)
            sums = shared.get(key)
            if sums is None:
                tensor, batch = select_output(rule, name, module, output)
                sums = shared[key] = OutputSums(tensor, batch)
            if first is None:
                first = sums
            weight = self._weights[r]
            if weight == 0.0:
                continue  # a schedule at zero: nothing to add (the scale below is still measured)
            penalty = rule_penalty(rule, sums, weight)
            pending = self._pending[r]
            self._pending[r] = penalty if pending is None else pending + penalty
        # activation scale: stays on the device until a logging step
        self.state["sum_sq"][index] += first.sum_sq_detached()
        self.state["counts"][index] += first.tensor.numel()

    def _drain(self) -> Tensor | None:
        """The penalties pending since the last backward (with graph), for :class:`BackwardPatch`."""
        total: Tensor | None = None
        for r, term in enumerate(self._pending):
            if term is None:
                continue
            self.state["penalty"][r] += term.detach()
            total = term if total is None else total + term
        if total is not None:
            self._pending = [None] * len(self.rules)
        return total

    # ------------------------------------------------------------------ StatSource (read by the hub)
    def collect(self) -> StatBlock:
        return self.state.block(self._read_key)

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        *elements, batches = values[f"{self._read_key}.counts"]
        if batches:
            penalties = [value / batches for value in values[f"{self._read_key}.penalty"]]
            for rule, value in zip(self.rules, penalties):
                snapshot.put("activity_penalty", value, rule.name)
            snapshot.put("activity_penalty", math.fsum(penalties))
        for (name, _, _), sum_sq, count in zip(self._targets, values[f"{self._read_key}.sum_sq"], elements):
            if count:
                snapshot.put("activity_rms", math.sqrt(sum_sq / count), name)
        self.last_snapshot = snapshot

    def reset(self) -> None:
        self.state.reset()

    @property
    def _read_key(self) -> str:
        # unique across the sources of one read (two regularizers in one Trainer)
        return f"ActivityRegularizer@{id(self):x}"

    def histograms(self) -> dict[str, Tensor]:
        return {}

    def _stop_batch(self) -> None:
        self._active = False
        self._pending = [None] * len(self.rules)

    def _uninstall(self) -> None:
        self._hooks.stop()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._strategy is not None:
            BackwardPatch.detach(self._strategy, self._drain)
        self._strategy = None
        self._patch = None
        self._active = False
        self._pending = [None] * len(self.rules)
        self._targets = []  # do not pin the model
        self.state.release()
