"""Keeping ``Watch()`` within a share of the run's time: its default cadence stretches on fast steps.

A logging step of per-layer statistics costs about the same few milliseconds of host time whatever
the step: nothing on a 100 ms step, 5-10 % of a 2 ms one (``benchmarks/step_cost.py``). So the
default cadence is a budget, not only a step count: ``Pace`` estimates the share of the wall time
that measuring took in each logging window, and when it is over ``budget`` the default intervals
(those not given explicitly: ``Cadence.stretchable``) become a power of two longer, at most
:data:`MOST_STRETCH` times, never shorter again in that fit. The first :data:`FULL_WINDOWS` windows
keep the resolved cadence, so alerts keep their resolution early in training, where most faults
show; a short fit (a test, a sweep's trial) is never stretched. Each stretch is said once, with the
way back.

The estimate costs nothing on a quiet batch: the clock is read at the end of the quiet batch that
precedes busy ones and at the end of each busy batch (sampled, logging, one-time checks), so each
busy batch's duration is known; what it took beyond the window's mean quiet batch is measuring.
Validation, checkpoints and data loading between batches count as quiet time, which only lowers
the estimate (a stretch is never caused by them). Under DDP the share joins the logging step's one
read as a maximum, so every rank takes the same decision at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_watch.cadence import Cadence
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock

#: default share of the wall time that ``Watch()``'s statistics may take
DEFAULT_BUDGET = 0.02
#: most times longer than resolved that a default interval becomes (50 steps: at most 400)
MOST_STRETCH = 8
#: fewest quiet batches in a window for an estimate (their mean is the reference step)
MIN_QUIET = 8
#: windows read at the resolved cadence before any stretch: early training is where most faults show
#: (the fault benchmark's median first alert is at its second window), so alerts keep their resolution there
FULL_WINDOWS = 4


def check_budget(budget: float | None) -> float | None:
    """Validate ``Watch(budget=...)``; raises ``ValueError`` naming it."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ValueError(
            f"`budget` must be a share of the run's time in (0, 1), such as 0.02, or None; got {budget!r}."
        )
    return float(budget)


class Pace:
    """The measuring share of each logging window, and the stretch of the default cadences it calls for.

    A :class:`~lightning_watch.hub.StatSource` that rides along every read (``rides_along``): it adds
    ``watch_overhead`` (the last window's estimated share) to the snapshot, and stretches
    ``cadences`` when the share is over ``budget``.

    Example:
        >>> c = Cadence(log=50, sample=10, stretchable=True)
        >>> pace = Pace([c], budget=0.02, full_windows=1)  # may stretch after the first window
        >>> pace.open_window(0.0, step=0)
        >>> pace.quiet_end(0.098)  # 49 quiet batches of 2 ms, and the next is busy
        >>> pace.busy_end(0.108)  # a busy batch of 10 ms: 8 ms of measuring
        >>> pace.measure(step=50); round(pace.share, 3)  # the logging batch ends the window
        0.074
        >>> pace.decide(pace.share), c.log, c.sample  # 7.4 % over 2 %: four times less often
        (4, 200, 40)
    """

    rides_along = True
    cadence = None  # never causes a read: joins those that happen

    def __init__(
        self,
        cadences: Sequence[Cadence],
        budget: float | None = DEFAULT_BUDGET,
        on_stretch: Callable[[Pace], None] | None = None,
        full_windows: int = FULL_WINDOWS,
    ) -> None:
        self.cadences = list(cadences)
        self.budget = check_budget(budget)
        self.factor = 1
        self.share: float | None = None  # this window's estimate, until it is read
        self.share_seen: float | None = None  # the last estimate that was read
        self.windows = 0  # windows estimated and read in this fit
        self.full_windows = full_windows
        self._on_stretch = on_stretch
        self._mark: float | None = None  # clock at the end of the last timed batch
        self._busy_seconds = 0.0
        self._busy = 0
        self._window_start: float | None = None
        self._steps_at_start = 0
        self._next_window: tuple[float, int] | None = None

    # ------------------------------------------------------------------ the clock (host only)
    def quiet_end(self, now: float) -> None:
        """A quiet batch ended and the next may be busy."""
        self._mark = now

    def busy_end(self, now: float) -> None:
        """A busy batch ended: its duration since the last mark is measuring plus one step."""
        if self._mark is not None:
            self._busy_seconds += now - self._mark
            self._busy += 1
        self._mark = now

    def gap(self) -> None:
        """Something that is not a training step ran (validation): the next busy batch is not timed."""
        self._mark = None

    def open_window(self, now: float, step: int) -> None:
        """A window starts at ``now``, with the batch of ``step`` (the fit's start, or a read)."""
        self._window_start, self._steps_at_start = now, step
        self._busy_seconds, self._busy = 0.0, 0

    def measure(self, step: int) -> None:
        """The batch of ``step`` is about to be read: estimate the share over the window before it."""
        self.share, self._next_window = None, None
        if self._window_start is None or self._mark is None:
            return
        steps, seconds = step - self._steps_at_start, self._mark - self._window_start
        quiet = steps - self._busy
        self._next_window = (self._mark, step)  # this batch belongs to the next window
        if self._busy == 0 or quiet < MIN_QUIET or seconds <= 0:
            return
        quiet_mean = max(seconds - self._busy_seconds, 0.0) / quiet
        self.share = max(self._busy_seconds - self._busy * quiet_mean, 0.0) / seconds

    # ------------------------------------------------------------------ the read (StatSource)
    def collect(self) -> StatBlock:
        block = StatBlock()
        block.add_max("pace.share", [self.share if self.share is not None else -1.0])  # host: no device
        if self._next_window is not None:
            self.open_window(*self._next_window)
        self.share, self._next_window = None, None  # a read driven by another callback finds nothing
        return block

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        share = values["pace.share"][0]
        if share >= 0:
            snapshot.global_["watch_overhead"] = share
            self.decide(share)

    def reset(self) -> None:
        pass  # the window restarts when it is collected

    def histograms(self) -> dict:
        return {}

    def state_dict(self) -> dict[str, int]:
        return {"factor": self.factor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stretch(int(state.get("factor", 1)))

    def notice(self, callback: str) -> str:
        """The one line said when the cadence stretches."""
        logs = sorted({(c.base_log, c.log) for c in self.cadences if c.stretchable})
        base, now = logs[0] if logs else (0, 0)
        share = f"{self.share_seen:.1%}" if self.share_seen is not None else "more than the budget"
        return (
            f"{callback} now writes its statistics every {now} steps instead of every {base}: they took {share} "
            f"of this run's time, over its budget of {self.budget:.0%} (small models on fast steps). Pass "
            f"`log_every_n_steps={base}` to {callback} to keep them that often, or `budget=None`."
        )

    # ------------------------------------------------------------------ the decision
    def decide(self, share: float) -> int | None:
        """Stretch the cadences when ``share`` is over the budget; returns the new factor, if any."""
        self.share_seen = share
        self.windows += 1
        if (
            self.windows < self.full_windows
            or self.budget is None
            or share <= self.budget
            or self.factor >= MOST_STRETCH
        ):
            return None
        # the share falls about in proportion to the stretch: the same busy batches over a longer window
        wanted = self.factor * share / self.budget
        factor = min(MOST_STRETCH, 2 ** math.ceil(math.log2(wanted)))
        return self.stretch(factor)

    def stretch(self, factor: int) -> int | None:
        if factor <= self.factor:
            return None
        self.factor = factor
        if not any([c.stretch(factor) for c in self.cadences]):
            return None
        if self._on_stretch is not None:
            self._on_stretch(self)
        return factor
