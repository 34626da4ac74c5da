"""What every monitor shares: module selection, cadence, lifecycle, and joining the statistics hub.

A monitor subclass supplies the statistics (``_collect`` device tensors, ``_finalize`` host
values); this base class decides *when* (sampling and logging steps, from :mod:`cadence`),
arms the shared capture engine, and offers the public :class:`~lightning_watch.hub.StatSource`
face (``collect``/``finalize``/``reset``/``histograms``/``cadence``) that the hub reads.

The measuring steps (``prepare``, ``start``, ``begin_batch``, ``before_optimizer_step``,
``end_batch``, ``stop``) are public so that a bundle (``Watch``) can drive several monitors
from its own hooks; the Lightning hooks of a standalone monitor call the same steps and make the
monitor a hub member of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_watch.cadence import NEVER, Cadence, QuietSteps, check_interval, logging_step, steps_optimizer
from lightning_watch.callback_keys import CachedStateKey
from lightning_watch.capture import CapturedOutput, CaptureEngine, ModuleInfo
from lightning_watch.hub import SnapshotListener, StatHub
from lightning_watch.selection import ModuleSelection
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock, StateRegistry
from lightning_watch.subscription import HookSubscription


def strategy_shards_parameters(trainer: pl.Trainer) -> bool:
    """True under FSDP-like strategies, where each rank holds a shard of each parameter."""
    name = type(trainer.strategy).__name__
    return "FSDP" in name or "DeepSpeed" in name or "ModelParallel" in name


class WatchMonitor(CachedStateKey):
    """Base class of the four monitors (not used directly).

    Args:
        include: glob(s) over qualified module names to watch; ``None`` for the monitor's default.
        exclude: glob(s) of module names to leave out.
        types: module classes (or names such as ``"Linear"``/``"torch.nn.Conv2d"``) to watch.
        log_every_n_steps: write interval in Lightning steps; ``None`` follows the Trainer's
            ``log_every_n_steps``, but writes at most every 10 steps (a Trainer at
            ``log_every_n_steps=1`` gets a point every 10 steps; a notice at fit start says so).
        sample_every_n_steps: interval of the steps whose activations and gradients are
            measured for windowed statistics; ``None`` means ``SAMPLES_PER_WINDOW`` samples per
            logging window (five; one for activation scales), but at most one batch in five.
        histogram_every_n_steps: interval of TensorBoard histograms; ``None`` (default) writes none.
    """

    #: per-module metric names this monitor writes (``watch.<metric>/<NN>.<module>``)
    METRICS: tuple[str, ...] = ()
    #: whole-model metric names (``watch.global/<metric>``)
    GLOBAL_METRICS: tuple[str, ...] = ()
    #: whether the monitor needs module outputs from the capture engine
    CAPTURES_OUTPUTS = False
    #: sampled batches per logging window when ``sample_every_n_steps`` is not given (see :mod:`cadence`)
    SAMPLES_PER_WINDOW = 5

    def __init__(
        self,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: Sequence[type | str] | None = None,
        log_every_n_steps: int | None = None,
        sample_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
    ) -> None:
        self._selection = ModuleSelection.from_args(include, exclude, types)
        self._log_every_n_steps = check_interval("log_every_n_steps", log_every_n_steps)
        self._sample_every_n_steps = check_interval("sample_every_n_steps", sample_every_n_steps)
        self._histogram_every_n_steps = check_interval("histogram_every_n_steps", histogram_every_n_steps)
        self._modules: list[tuple[str, nn.Module]] = []
        self._infos: list[ModuleInfo] = []
        self._engine: CaptureEngine | None = None
        self._cadence: Cadence | None = None
        self._device = torch.device("cpu")
        self.last_snapshot: Snapshot | None = None
        self._sampling = False  # whether the current batch is sampled
        self._hooks = HookSubscription(self)  # standalone use: which of its hooks Lightning calls
        self._quiet = QuietSteps()  # standalone use: the steps before the next one this monitor works at
        self._plain = False  # standalone use: whether the current batch is one of them
        self._histogram_due = False  # whether the current batch writes histograms
        self._pending_listeners: list[SnapshotListener] = []
        #: the device accumulators of the open window, declared by ``_declare_state`` each fit
        self.state = StateRegistry()

    # ------------------------------------------------------------------ configuration
    def _state_fields(self) -> dict[str, Any]:
        selection = self._selection
        return {
            "include": selection.include,
            "exclude": selection.exclude,
            "types": [t.__name__ for t in selection.types],
        }

    @property
    def module_names(self) -> list[str]:
        """Qualified names of the watched modules, in registration order (after ``setup``)."""
        return [name for name, _ in self._modules]

    @property
    def cadence(self) -> Cadence | None:
        """When this monitor samples, logs and writes histograms (``None`` before ``setup``)."""
        return self._cadence

    def add_listener(self, listener: SnapshotListener) -> None:
        """Call ``listener(trainer, pl_module, snapshot)`` after each publication that includes this monitor.

        Listeners are the hub's: a listener of a standalone monitor receives the snapshot of every
        publication of its Trainer (all of this package's callbacks share one read per step).
        """
        self._pending_listeners.append(listener)

    def _default_module(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def _uncaptured(self) -> set[int]:
        """Indices of watched modules whose outputs this monitor does not need (no hook on them for it)."""
        return set()

    # ------------------------------------------------------------------ measuring steps (public: Watch drives them)
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve the selection and the cadence, subscribe to the capture engine (``setup``)."""
        self._selection.check_types(pl_module)
        self._modules = self._selection.resolve(pl_module, self._default_module)
        self._cadence = Cadence.resolve(
            trainer,
            self._log_every_n_steps,
            self._sample_every_n_steps,
            self._histogram_every_n_steps,
            samples_per_window=self.SAMPLES_PER_WINDOW,
        )
        self._device = pl_module.device
        if self.CAPTURES_OUTPUTS:
            self._engine = CaptureEngine.for_model(pl_module)
            self._infos = self._engine.subscribe(self, self._modules, skip=self._uncaptured())
        self.state.clear()
        self._declare_state(self.state)
        self._on_setup(trainer, pl_module)

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Allocate device state: the model is on its final device (``on_fit_start``)."""
        self._device = pl_module.device
        self.state.allocate(self._device)  # also applies a checkpoint restored after `setup`
        self._on_fit_start(trainer, pl_module)

    def stop(self) -> None:
        """Remove every hook and drop per-fit state (``teardown``, also after an exception)."""
        if self._engine is not None:
            self._engine.unsubscribe(self)
            self._engine = None
        # the window's accumulators stay: `trainer.save_checkpoint` after fit still saves them
        self._on_teardown()

    def next_busy(self, step: int) -> int:
        """The first step ``>= step`` at which this monitor measures (``cadence.NEVER`` before it is set up)."""
        return NEVER if self._cadence is None else self._cadence.next_sample_step(step)

    def begin_batch(self, step: int) -> None:
        """Arm the capture engine if ``step`` is sampled."""
        self._sampling = self._cadence.is_sample_step(step)
        self._histogram_due = self._cadence.is_histogram_step(step)
        if self._engine is not None and self._sampling:
            self._engine.arm(self)

    def before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, step: int
    ) -> None:
        """Gradients are final for this optimizer (unscaled, not clipped)."""
        self._before_optimizer_step(trainer, pl_module, optimizer, step)

    def end_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stepped: bool, step: int) -> None:
        """Disarm the capture engine; on a batch that stepped the optimizer, finish its measurements."""
        if self._engine is not None:
            self._engine.disarm(self)
        self._on_batch_end()
        if stepped:
            self._on_step_end(trainer, pl_module, step)

    # ------------------------------------------------------------------ StatSource (read by the hub)
    def collect(self) -> StatBlock:
        return self._collect()

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        self._finalize(values, snapshot)
        self.last_snapshot = snapshot

    def reset(self) -> None:
        self.state.reset()
        self._reset()

    def histograms(self) -> dict[str, Tensor]:
        return self._histograms()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        # checkpoint saving is not a hot path: one host copy of the open window
        return self.state.state_dict() if self.state.allocated else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.load_state_dict(state_dict)

    # ------------------------------------------------------------------ Lightning hooks (standalone use)
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.prepare(trainer, pl_module)
        hub = StatHub.for_trainer(trainer)
        hub.join(self, [self])
        for listener in self._pending_listeners:
            hub.listen(listener)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start(trainer, pl_module)
        self._quiet, self._plain = QuietSteps(self._hooks), False  # the first batch is never quiet
        notice = self._cadence.floor_notice(type(self).__name__)
        if notice:
            rank_zero_info(notice)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        StatHub.for_trainer(trainer).flush(trainer, pl_module)  # the last, unfinished window is read too

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._hooks.stop()
        self.stop()
        StatHub.for_trainer(trainer).leave(self)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call `teardown` on callbacks after an exception: without this, a
        # crash in the user's code would leave our hooks on their model (and it would not pickle)
        self.teardown(trainer, pl_module, "fit")

    # The fast path, as in `Watch`: on a batch before the next step this monitor or the hub has work
    # at, Lightning calls only `on_train_batch_end` (or, where it cannot skip hooks, the batch costs
    # one comparison in `on_train_batch_start` and the other hooks return at once).
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._plain = self._quiet.quiet(trainer)
        if not self._plain:
            self.begin_batch(logging_step(trainer))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self._plain:
            self.before_optimizer_step(trainer, pl_module, optimizer, logging_step(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._plain:
            self._quiet.plain_end(trainer)
            return
        stepped = steps_optimizer(trainer)
        step = logging_step(trainer)
        self.end_batch(trainer, pl_module, stepped, step)
        if stepped:
            hub = StatHub.for_trainer(trainer)
            hub.batch_end(self, trainer, pl_module)
            self._plain = self._quiet.after(step, self.next_busy, hub.next_due)

    # ------------------------------------------------------------------ subclass interface
    def _declare_state(self, state: StateRegistry) -> None:
        """Declare the window's accumulators (the selection is resolved; sizes may be callables)."""

    def _on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build per-fit state (the selection is resolved)."""

    def _on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Allocate device buffers (the model is on its final device)."""

    def _on_teardown(self) -> None:
        """Drop per-fit state and remove any hook the subclass registered."""

    def _before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, step: int
    ) -> None:
        """Called before each optimizer step (gradients final)."""

    def _on_batch_end(self) -> None:
        """Called at the end of each batch this monitor measured in (accumulating ones too), before publication."""

    def _on_step_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Called at the end of each optimizer-stepping batch, before publication."""

    def consume(self, index: int, captured: CapturedOutput) -> None:
        """Receive one module call's output (monitors with ``CAPTURES_OUTPUTS``)."""

    def _collect(self) -> StatBlock:
        """Device tensors to read this logging step, with their cross-process reductions."""
        return StatBlock()

    def _finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        """Turn read values into snapshot entries."""

    def _reset(self) -> None:
        """Start a new window after publication."""

    def _histograms(self) -> dict[str, Tensor]:
        """``tag -> tensor`` to write as histograms on histogram steps."""
        return {}

    def _key(self, name: str) -> str:
        # statistic names are unique across the sources of one read (two monitors of one class too)
        return f"{type(self).__name__}@{id(self):x}.{name}"
