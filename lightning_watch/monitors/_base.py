"""What every monitor shares: module selection, cadence, lifecycle, and publishing.

A monitor subclass supplies the statistics (``_collect`` device tensors, ``_finalize`` host
values); this base class decides *when* (sampling and logging steps, from :mod:`cadence`),
arms the shared capture engine, and publishes: one read of all accumulators (one collective, one
host transfer) per logging step, then scalars to every logger and the snapshot to listeners
(such as early alerts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_watch.cadence import Cadence, check_interval, logging_step, steps_optimizer
from lightning_watch.capture import CapturedOutput, CaptureEngine, ModuleInfo
from lightning_watch.selection import ModuleSelection
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock, read_blocks
from lightning_watch.writers import add_histograms, add_layout, log_scalars

SnapshotListener = Callable[[pl.Trainer, pl.LightningModule, Snapshot], None]


def strategy_shards_parameters(trainer: pl.Trainer) -> bool:
    """True under FSDP-like strategies, where each rank holds a shard of each parameter."""
    name = type(trainer.strategy).__name__
    return "FSDP" in name or "DeepSpeed" in name or "ModelParallel" in name


def gather_for(trainer: pl.Trainer):
    """The all-gather to reduce statistics with, or ``None`` in a single process."""
    if trainer.world_size <= 1:
        return None
    return lambda tensor: trainer.strategy.all_gather(tensor)


def publish(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    monitors: Sequence[WatchMonitor],
    listeners: Sequence[SnapshotListener] = (),
) -> Snapshot:
    """Read, reduce, finalize and write the statistics of ``monitors`` for this logging step."""
    blocks = [monitor._collect(trainer) for monitor in monitors]
    values = read_blocks(blocks, gather=gather_for(trainer))
    snapshot = Snapshot(step=logging_step(trainer), epoch=trainer.current_epoch)
    for monitor in monitors:
        monitor._finalize(values, snapshot)
        monitor._reset()
    log_scalars(trainer, snapshot)
    for listener in listeners:
        listener(trainer, pl_module, snapshot)
    return snapshot


class WatchMonitor(Callback):
    """Base class of the four monitors (not used directly).

    Args:
        include: glob(s) over qualified module names to watch; ``None`` for the monitor's default.
        exclude: glob(s) of module names to leave out.
        types: module classes (or names such as ``"Linear"``/``"torch.nn.Conv2d"``) to watch.
        log_every_n_steps: write interval in Lightning steps; ``None`` follows the Trainer's
            ``log_every_n_steps``, but writes at most every 10 steps (a Trainer at
            ``log_every_n_steps=1`` gets a point every 10 steps; a notice at fit start says so).
        sample_every_n_steps: interval of the steps whose activations and gradients are
            measured for windowed statistics; ``None`` means five samples per logging window,
            but at most one batch in five.
        histogram_every_n_steps: interval of TensorBoard histograms; ``None`` (default) writes none.
    """

    #: per-module metric names this monitor writes (``watch/<metric>/<module>``)
    METRICS: tuple[str, ...] = ()
    #: whole-model metric names (``watch/global/<metric>``)
    GLOBAL_METRICS: tuple[str, ...] = ()
    #: whether the monitor needs module outputs from the capture engine
    CAPTURES_OUTPUTS = False

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
        self._managed = False  # True when a `Watch` drives this monitor and publishes for it
        self._listeners: list[SnapshotListener] = []
        self._modules: list[tuple[str, nn.Module]] = []
        self._infos: list[ModuleInfo] = []
        self._engine: CaptureEngine | None = None
        self._cadence: Cadence | None = None
        self._device = torch.device("cpu")
        self.last_snapshot: Snapshot | None = None
        self._sampling = False  # whether the current batch is sampled
        self._histogram_due = False  # whether the current batch writes histograms

    # ------------------------------------------------------------------ configuration
    @property
    def state_key(self) -> str:
        # Lightning reads `state_key` around every hook call (profiler names): build it once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(
                include=self._selection.include,
                exclude=self._selection.exclude,
                types=[t.__name__ for t in self._selection.types],
            )
        return key

    @property
    def module_names(self) -> list[str]:
        """Qualified names of the watched modules, in registration order (after ``setup``)."""
        return [name for name, _ in self._modules]

    def add_listener(self, listener: SnapshotListener) -> None:
        """Call ``listener(trainer, pl_module, snapshot)`` after each publication."""
        self._listeners.append(listener)

    def _default_module(self, module: nn.Module) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._selection.check_types(pl_module)
        self._modules = self._selection.resolve(pl_module, self._default_module)
        self._cadence = Cadence.resolve(
            trainer, self._log_every_n_steps, self._sample_every_n_steps, self._histogram_every_n_steps
        )
        self._device = pl_module.device
        if self.CAPTURES_OUTPUTS:
            self._engine = CaptureEngine.for_model(pl_module)
            self._infos = self._engine.subscribe(self, self._modules)
        self._on_setup(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the device is final here (setup runs before the model is moved)
        self._device = pl_module.device
        self._on_fit_start(trainer, pl_module)
        if not self._managed:
            add_layout(trainer, self.METRICS, self.GLOBAL_METRICS)
            notice = self._cadence.floor_notice(type(self).__name__)
            if notice:
                rank_zero_info(notice)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._engine is not None:
            self._engine.unsubscribe(self)
            self._engine = None
        self._on_teardown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call `teardown` on callbacks after an exception: without this, a
        # crash in the user's code would leave our hooks on their model (and it would not pickle)
        self.teardown(trainer, pl_module, "fit")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = logging_step(trainer)
        self._sampling = self._cadence.is_sample_step(step)
        self._histogram_due = self._cadence.is_histogram_step(step)
        if self._engine is not None and self._sampling:
            self._engine.arm(self)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._engine is not None:
            self._engine.disarm(self)
        if not steps_optimizer(trainer):
            return
        step = logging_step(trainer)
        self._on_step_end(trainer, pl_module, step)
        if self._managed:
            return
        if self._cadence.is_histogram_step(step):
            add_histograms(trainer, self._histograms(), step)
        if self._cadence.is_log_step(step):
            self.last_snapshot = publish(trainer, pl_module, [self], self._listeners)

    # ------------------------------------------------------------------ subclass interface
    def _on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build per-fit state (the selection is resolved)."""

    def _on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Allocate device buffers (the model is on its final device)."""

    def _on_teardown(self) -> None:
        """Drop per-fit state and remove any hook the subclass registered."""

    def _on_step_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Called at the end of each optimizer-stepping batch, before publication."""

    def consume(self, index: int, captured: CapturedOutput) -> None:
        """Receive one module call's output (monitors with ``CAPTURES_OUTPUTS``)."""

    def _collect(self, trainer: pl.Trainer) -> StatBlock:
        """Device tensors to read this logging step, with their cross-process reductions."""
        return StatBlock()

    def _finalize(self, values: dict[str, Any], snapshot: Snapshot) -> None:
        """Turn read values into snapshot entries."""

    def _reset(self) -> None:
        """Start a new window after publication."""

    def _histograms(self) -> dict[str, Tensor]:
        """``tag -> tensor`` to write as histograms on histogram steps."""
        return {}

    def _key(self, name: str) -> str:
        # statistic names are unique across monitors sharing one read
        return f"{type(self).__name__}.{name}"
