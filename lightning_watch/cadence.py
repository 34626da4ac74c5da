"""When monitors measure: logging steps, sampling steps, histogram steps.

Steps are Lightning's own logging steps (``_batches_that_stepped``, the x-axis of every
``self.log`` curve), so our charts line up with the user's ``train_loss``, advance once per
optimizer step under gradient accumulation, once per batch under manual optimization, and
continue where they stopped after a checkpoint resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import lightning.pytorch as pl

from lightning_watch.subscription import HookSubscription


def check_interval(name: str, value: int | None, allow_none: bool = True) -> int | None:
    """Validate a ``*_every_n_steps`` argument; raises ``ValueError`` naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        valid = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")
    return value


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs the current training batch at."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


#: a step no cadence ever reaches: "nothing is due again in this fit"
NEVER = 2**62


def next_due(step: int, intervals: Iterable[int]) -> int:
    """The first step ``t >= step`` with ``(t + 1)`` a multiple of one of ``intervals`` (:data:`NEVER` if none).

    The per-step fast path compares the current step with this once, instead of asking every
    monitor whether it is due.

    Example:
        >>> next_due(0, [10, 50]), next_due(10, [10, 50]), next_due(49, [10, 50]), next_due(3, [])
        (9, 19, 49, 4611686018427387904)
    """
    return min((((step + i) // i) * i - 1 for i in intervals), default=NEVER)


class QuietSteps:
    """A callback's fast path: the steps before the next one at which it has anything to do.

    ``quiet(trainer)`` is one comparison; after a busy batch that stepped the optimizer,
    ``after(step, *next_busy)`` asks each ``next_busy(step) -> int`` (monitors, probes, the hub)
    for the first step it needs, and remembers the earliest. Given the callback's
    :class:`~lightning_watch.subscription.HookSubscription`, a run of quiet batches also costs no
    hook call but ``keep`` (by default ``on_train_batch_end``, which calls :meth:`plain_end`).

    Example:
        >>> quiet = QuietSteps()
        >>> quiet.after(9, lambda s: next_due(s, [10]), lambda s: next_due(s, [50]))
        True
        >>> quiet.until
        19
    """

    def __init__(self, hooks: HookSubscription | None = None, keep: Iterable[str] = ("on_train_batch_end",)) -> None:
        self.until = 0  # the first batch is never quiet: one-time checks run there
        self._hooks = hooks
        self._keep = tuple(keep)
        if hooks is not None:
            hooks.all()

    def quiet(self, trainer: pl.Trainer) -> bool:
        return logging_step(trainer) < self.until

    def after(self, step: int, *next_busy: Callable[[int], int]) -> bool:
        """Whether the next batch is quiet for certain (then only the ``keep`` hooks are called)."""
        self.until = min(busy(step + 1) for busy in next_busy)
        quiet_next = step + 1 < self.until  # the next batch's step is `step + 1`, or `step` when it accumulates
        if quiet_next and self._hooks is not None:
            self._hooks.only(*self._keep)
        return quiet_next

    def plain_end(self, trainer: pl.Trainer) -> bool:
        """At the end of a quiet batch: whether the next may be busy (every hook is then called again)."""
        if logging_step(trainer) + 1 < self.until:
            return False
        if self._hooks is not None and self._hooks.narrowed:
            self._hooks.all()
        return True


def steps_optimizer(trainer: pl.Trainer) -> bool:
    """Whether the current training batch ends a gradient-accumulation cycle."""
    return not trainer.fit_loop.epoch_loop._should_accumulate()


#: Fewest steps between two writes when the interval is inherited from the Trainer. A Trainer's
#: ``log_every_n_steps=1`` usually asks for a per-step loss curve; per-layer statistics on every
#: step would cost 30-50 % of a small model's step (benchmarks/overhead.py), so they are written
#: every 10 steps unless the callback's own ``log_every_n_steps`` asks for more.
MIN_INHERITED_LOG_INTERVAL = 10

#: Fewest steps between two sampled batches when ``sample_every_n_steps`` is not given: a
#: sampled batch pays a forward hook and a few reductions per watched output, so at most one
#: batch in five pays it by default.
MIN_DEFAULT_SAMPLE_INTERVAL = 5


@dataclass
class Cadence:
    """Resolved intervals: ``log`` for writing, ``sample`` for forward/gradient sampling.

    Example:
        >>> c = Cadence(log=50, sample=10)
        >>> [s for s in range(60) if c.is_sample_step(s)][:3], c.is_log_step(49)
        ([9, 19, 29], True)
    """

    log: int
    sample: int
    histogram: int | None = None
    #: the Trainer's ``log_every_n_steps`` when :data:`MIN_INHERITED_LOG_INTERVAL` raised it, else None
    raised_from: int | None = None
    #: whether :meth:`stretch` may lengthen ``log`` and ``sample`` (neither was given explicitly)
    stretchable: bool = False

    def __post_init__(self) -> None:
        self.base_log, self.base_sample = self.log, self.sample

    @classmethod
    def resolve(
        cls,
        trainer: pl.Trainer,
        log_every_n_steps: int | None,
        sample_every_n_steps: int | None,
        histogram_every_n_steps: int | None = None,
        min_inherited_log: int = MIN_INHERITED_LOG_INTERVAL,
        samples_per_window: int = 5,
    ) -> Cadence:
        inherited = max(1, int(trainer.log_every_n_steps or 1))
        log = log_every_n_steps or max(min_inherited_log, inherited)
        raised_from = inherited if log_every_n_steps is None and log > inherited else None
        if trainer.fast_dev_run:
            # a dev run exists to exercise every code path on a few batches: ours included
            log = sample_every_n_steps = 1
            raised_from = None
        # Default: `samples_per_window` samples per logging window (five for dead units, whose "ever
        # active" union needs several batches; one for activation scales, a smooth quantity), so most
        # batches run with no hook at all (measured: benchmarks/step_cost.py), and never more than
        # one batch in MIN_DEFAULT_SAMPLE_INTERVAL.
        sample = sample_every_n_steps or max(log // samples_per_window, MIN_DEFAULT_SAMPLE_INTERVAL)
        stretchable = log_every_n_steps is None and sample_every_n_steps is None and not trainer.fast_dev_run
        return cls(
            log=log,
            sample=min(sample, log),
            histogram=histogram_every_n_steps,
            raised_from=raised_from,
            stretchable=stretchable,
        )

    def stretch(self, factor: int) -> bool:
        """Log and sample ``factor`` times less often than resolved (``lightning_watch.pace``); returns
        whether anything changed. Intervals given explicitly never change, nor do histograms.

        Example:
            >>> c = Cadence(log=50, sample=10, stretchable=True)
            >>> c.stretch(4), c.log, c.sample, c.is_log_step(199)
            (True, 200, 40, True)
        """
        if not self.stretchable:
            return False
        log, sample = self.base_log * factor, min(self.base_sample * factor, self.base_log * factor)
        changed = (log, sample) != (self.log, self.sample)
        self.log, self.sample = log, sample
        return changed

    def floor_notice(self, callback: str) -> str | None:
        """A one-line explanation when the Trainer's interval was raised, for the fit-start log."""
        if self.raised_from is None:
            return None
        return (
            f"{callback} writes its statistics every {self.log} steps, not every {self.raised_from} like the "
            f"Trainer's `log_every_n_steps`: per-layer statistics on every step would slow small models by "
            f"30-50 %. Pass `log_every_n_steps={self.raised_from}` to {callback} to have them that often."
        )

    def is_log_step(self, step: int) -> bool:
        return (step + 1) % self.log == 0

    def is_sample_step(self, step: int) -> bool:
        # the logging step is always sampled, so what is logged includes the latest batch
        return (step + 1) % self.sample == 0 or self.is_log_step(step) or self.is_histogram_step(step)

    def is_histogram_step(self, step: int) -> bool:
        return self.histogram is not None and (step + 1) % self.histogram == 0

    @property
    def write_intervals(self) -> tuple[int, ...]:
        """The intervals of the steps that read or write: logging and histogram steps."""
        return (self.log,) if self.histogram is None else (self.log, self.histogram)

    @property
    def sample_intervals(self) -> tuple[int, ...]:
        """The intervals of every step that measures anything (sampled steps include the others)."""
        return (self.sample, *self.write_intervals)

    def next_sample_step(self, step: int) -> int:
        """The first step ``>= step`` that is sampled (logging and histogram steps included)."""
        return next_due(step, self.sample_intervals)
