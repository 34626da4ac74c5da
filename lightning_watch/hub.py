"""The statistics hub: the one place that reads, reduces, writes and hands on what was measured.

Every callback of this package that measures something (``Watch``, a standalone monitor,
``EarlyAlerts``, ``ActivityRegularizer``) *joins* the hub of its Trainer with its
:class:`StatSource` objects and reports the end of each training batch. When the last member
has reported, the hub reads every source that is due at that step — one packed
``all_gather`` under DDP, one device-to-host copy — builds one :class:`Snapshot`, writes its
scalars to the loggers and calls the listeners (alert engines, the end-of-fit views). So
callbacks side by side still cost one collective per logging step, write each point once, and
alert rules see every family's values of a step together.

The data path, one direction::

    hooks ─► capture / monitors (device accumulators) ─► StatHub.read ─► Snapshot ─┬─► writers
                                                                                   └─► listeners (alerts, views)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import lightning.pytorch as pl
from torch import Tensor

from lightning_watch.cadence import Cadence, logging_step, next_due
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock, read_blocks
from lightning_watch.writers import add_histograms, log_scalars

SnapshotListener = Callable[[pl.Trainer, pl.LightningModule, Snapshot], None]


@runtime_checkable
class StatSource(Protocol):
    """What the hub reads: device accumulators with declared reductions, turned into snapshot values.

    ``cadence`` says when the source is due (``None``: not set up, never due). A source whose
    ``rides_along`` is true joins reads that happen anyway and never causes one (the DDP action
    flags of the alert engine).
    """

    cadence: Cadence | None

    def collect(self) -> StatBlock:
        """Device tensors for this read; names unique across sources (prefix them)."""

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        """Turn the read host values into snapshot entries."""

    def reset(self) -> None:
        """Start a new window after the read."""

    def histograms(self) -> dict[str, Tensor]:
        """``tag -> tensor`` to write on histogram steps."""


def gather_for(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
    """The all-gather to reduce statistics with, or ``None`` in a single process."""
    if trainer.world_size <= 1:
        return None
    return lambda tensor: trainer.strategy.all_gather(tensor)


def read(
    trainer: pl.Trainer, sources: Sequence[StatSource], snapshot: Snapshot | None = None, reset: bool = True
) -> Snapshot:
    """One read of ``sources``: one collective, one host transfer, then each source's finalize."""
    values = read_blocks([source.collect() for source in sources], gather=gather_for(trainer))
    snapshot = snapshot if snapshot is not None else Snapshot(step=logging_step(trainer), epoch=trainer.current_epoch)
    for source in sources:
        source.finalize(values, snapshot)
        if reset:
            source.reset()
    return snapshot


class StatHub:
    """The statistics hub of one Trainer (see the module docstring).

    Use :meth:`for_trainer`; members :meth:`join` in ``setup`` and :meth:`leave` in ``teardown``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(logger=False)
        >>> hub = StatHub.for_trainer(trainer)
        >>> hub.join("me", [])
        >>> StatHub.for_trainer(trainer) is hub, hub.members
        (True, ['me'])
        >>> hub.leave("me"); StatHub.for_trainer(trainer) is hub
        False
    """

    _hubs: ClassVar[weakref.WeakKeyDictionary[pl.Trainer, StatHub]] = weakref.WeakKeyDictionary()

    def __init__(self, trainer: pl.Trainer) -> None:
        self._trainer_ref = weakref.ref(trainer)
        self._members: dict[Any, list[StatSource]] = {}
        self._listeners: list[SnapshotListener] = []
        self._reported: set[int] = set()  # ids of members that ended the batch of step `_reported_at`
        self._reported_at = -1
        self._intervals: set[int] | None = None  # logging and histogram intervals of the sources
        self.last_snapshot: Snapshot | None = None
        self._flushed_at: int | None = None

    @classmethod
    def for_trainer(cls, trainer: pl.Trainer) -> StatHub:
        hub = cls._hubs.get(trainer)
        if hub is None:
            hub = cls._hubs[trainer] = cls(trainer)
        return hub

    # ------------------------------------------------------------------ membership
    @property
    def members(self) -> list[Any]:
        return list(self._members)

    def join(self, member: Any, sources: Sequence[StatSource]) -> None:
        """Add ``member`` (a callback) and the sources it measures; joining again replaces them."""
        self._members[member] = list(sources)
        self._intervals = None

    def leave(self, member: Any) -> None:
        """Remove ``member``; the hub of a Trainer is forgotten with its last member."""
        self._members.pop(member, None)
        self._reported.discard(id(member))
        self._intervals = None
        if not self._members:
            self._listeners.clear()
            trainer = self._trainer_ref()
            if trainer is not None and self._hubs.get(trainer) is self:
                del self._hubs[trainer]

    def cadences_changed(self) -> None:
        """A source's intervals changed (``lightning_watch.pace``): the next steps are looked up anew."""
        self._intervals = None

    def sources(self) -> list[StatSource]:
        return [source for sources in self._members.values() for source in sources]

    def listen(self, listener: SnapshotListener) -> None:
        """Call ``listener(trainer, pl_module, snapshot)`` after each publication."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unlisten(self, listener: SnapshotListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # ------------------------------------------------------------------ the end of a batch
    def batch_end(self, member: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Snapshot | None:
        """``member`` finished this optimizer-stepping batch; the last one to report publishes.

        Returns the snapshot when this call published, else ``None``.
        """
        if member not in self._members:
            return None
        step = logging_step(trainer)
        if step != self._reported_at:  # a member on its fast path reports only steps where something is due
            self._reported.clear()
            self._reported_at = step
        self._reported.add(id(member))
        if len(self._reported) < len(self._members):
            return None
        self._reported.clear()
        return self.publish_due(trainer, pl_module)

    def publish_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Snapshot | None:
        """Histograms and the one read of the sources due at this step, if any."""
        step = logging_step(trainer)
        if not self._anything_due(step):
            return None  # the fast path: most steps end here, after one modulo per distinct interval
        sources = self.sources()
        histograms: dict[str, Tensor] = {}
        for source in sources:
            if source.cadence is not None and source.cadence.is_histogram_step(step):
                histograms.update(source.histograms())
        add_histograms(trainer, histograms, step)
        due = [s for s in sources if s.cadence is not None and s.cadence.is_log_step(step)]
        if not due:
            return None
        due += [s for s in sources if getattr(s, "rides_along", False) and s not in due]
        return self.publish(trainer, pl_module, due)

    def flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Snapshot | None:
        """The end of fit: read what the last, unfinished window holds, and mark it ``final``.

        A fit shorter than one logging interval (everyone's first smoke test) is then judged and
        reported too, and rules that look at the end of training (``still_improving``) run. Every
        member calls it from ``on_train_end``; the first call reads (on every rank alike), the
        others find nothing left. When the last step was a logging step, its snapshot is re-judged
        as the final one without a new read.
        """
        step = logging_step(trainer) - 1  # the last batch that stepped
        if self._flushed_at == step or step < 0:
            return None
        self._flushed_at = step
        sources = [s for s in self.sources() if s.cadence is not None]
        last = self.last_snapshot
        if last is not None and last.step == step:
            snapshot = Snapshot(last.step, last.epoch, last.per_module, last.global_, final=True)
        elif sources:
            # not reset: a checkpoint saved after fit still holds the open window, and a resumed fit
            # continues it (its next logging step covers the whole window)
            at = Snapshot(step=step, epoch=trainer.current_epoch, final=True)
            snapshot = read(trainer, sources, at, reset=False)
            log_scalars(trainer, snapshot)
        else:
            return None
        self.last_snapshot = snapshot
        for listener in list(self._listeners):
            listener(trainer, pl_module, snapshot)
        return snapshot

    def next_due(self, step: int) -> int:
        """The first step ``>= step`` at which some source is read or writes histograms.

        A member may skip :meth:`batch_end` on the steps before it: nothing would be published.
        """
        if self._intervals is None:
            cadences = [s.cadence for s in self.sources() if s.cadence is not None]
            self._intervals = {interval for c in cadences for interval in c.write_intervals}
        return next_due(step, self._intervals)

    def _anything_due(self, step: int) -> bool:
        return self.next_due(step) == step

    def publish(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        sources: Sequence[StatSource],
        notify: bool = True,
    ) -> Snapshot:
        """Read ``sources`` now, write the snapshot's scalars and (``notify``) call the listeners."""
        snapshot = read(trainer, sources)
        log_scalars(trainer, snapshot)
        if notify:
            self.last_snapshot = snapshot
            for listener in list(self._listeners):
                listener(trainer, pl_module, snapshot)
        return snapshot
