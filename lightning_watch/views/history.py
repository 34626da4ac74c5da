"""A small, bounded history of per-layer statistics (plain floats), fed by snapshots or event files.

The live report (built from ``Watch``'s snapshots) and the command line (built from TensorBoard
event files) both feed the same :class:`History`, so they print the same numbers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

#: Per-layer statistics the report and the pictures use.
REPORT_METRICS: tuple[str, ...] = ("grad_norm", "update_ratio", "act_rms", "dead_frac")


class Track:
    """Running summary of one ``(metric, module)`` series plus its last ``maxlen`` points.

    The summary (last, extremes, count of non-finite values) covers the whole run; only the
    points kept for the heat maps are bounded.

    Example:
        >>> t = Track(maxlen=2)
        >>> for step, v in [(0, 1.0), (1, 3.0), (2, float("nan")), (3, 2.0)]:
        ...     t.add(step, v)
        >>> t.last, t.last_step, t.max, t.min, t.nonfinite, list(t.points)
        (2.0, 3, 3.0, 1.0, 1, [(2, nan), (3, 2.0)])
    """

    __slots__ = ("count", "first_nonfinite_step", "last", "last_step", "max", "min", "nonfinite", "points")

    def __init__(self, maxlen: int = 256) -> None:
        self.last = math.nan
        self.last_step = -1
        self.max = -math.inf
        self.min = math.inf
        self.count = 0
        self.nonfinite = 0
        self.first_nonfinite_step: int | None = None
        self.points: deque[tuple[int, float]] = deque(maxlen=maxlen)

    def add(self, step: int, value: float) -> None:
        value = float(value)
        self.last, self.last_step = value, int(step)
        self.count += 1
        self.points.append((int(step), value))
        if math.isfinite(value):
            self.max = max(self.max, value)
            self.min = min(self.min, value)
        else:
            self.nonfinite += 1
            if self.first_nonfinite_step is None:
                self.first_nonfinite_step = int(step)


class History:
    """``metric -> module -> Track`` for :data:`REPORT_METRICS`, modules in first-seen order.

    Args:
        maxlen: points kept per series for the heat maps (memory is
            ``metrics x modules x maxlen`` pairs of floats, whatever the run length).

    Raises:
        ValueError: if ``maxlen`` is not a positive int.

    Example:
        >>> from lightning_watch.snapshot import Snapshot
        >>> h = History(maxlen=8)
        >>> snap = Snapshot(step=4, epoch=0)
        >>> snap.put("grad_norm", 0.5, module="fc1")
        >>> h.add_snapshot(snap)
        >>> h.modules(), h.track("grad_norm", "fc1").last
        (['fc1'], 0.5)
    """

    def __init__(self, maxlen: int = 256, metrics: Iterable[str] = REPORT_METRICS) -> None:
        if not isinstance(maxlen, int) or isinstance(maxlen, bool) or maxlen < 1:
            raise ValueError(f"`maxlen` must be a positive int, got {maxlen!r}.")
        self.maxlen = maxlen
        self.metrics = tuple(metrics)
        self.tracks: dict[str, dict[str, Track]] = {m: {} for m in self.metrics}
        self._order: dict[str, None] = {}
        self.last_step = -1

    def merge_order(self, modules: Iterable[str]) -> None:
        """Merge an ordered module list (one metric's registration order) into the layer order.

        Metrics cover different subsets (gradients: layers with parameters; activations: every
        layer), so a new name goes right after its predecessor in ``modules``, keeping forward order.

        Example:
            >>> h = History()
            >>> h.merge_order(["fc1", "fc2"]); h.merge_order(["fc1", "relu", "fc2"])
            >>> h.modules()
            ['fc1', 'relu', 'fc2']
        """
        order = list(self._order)
        previous = None
        for name in modules:
            if name not in self._order:
                at = order.index(previous) + 1 if previous is not None else 0
                order.insert(at, name)
                self._order = dict.fromkeys(order)
            previous = name

    def add(self, metric: str, module: str, step: int, value: float) -> None:
        if metric not in self.tracks:
            return
        self._order.setdefault(module, None)
        row = self.tracks[metric]
        track = row.get(module)
        if track is None:
            track = row[module] = Track(self.maxlen)
        track.add(step, value)
        self.last_step = max(self.last_step, int(step))

    def add_snapshot(self, snapshot) -> None:
        """Record the per-module values of one :class:`~lightning_watch.snapshot.Snapshot`."""
        if snapshot.global_ or snapshot.per_module:  # whole-model values count as a logged step too
            self.last_step = max(self.last_step, int(snapshot.step))
        for metric in self.metrics:
            self.merge_order(snapshot.modules(metric))
            for module, value in snapshot.modules(metric).items():
                self.add(metric, module, snapshot.step, value)

    def modules(self) -> list[str]:
        """Modules in the order first seen (the snapshot's registration order: forward order)."""
        return list(self._order)

    def track(self, metric: str, module: str) -> Track | None:
        return self.tracks.get(metric, {}).get(module)

    def matrix(self, metric: str) -> tuple[list[str], list[int], list[list[float]]]:
        """``(modules, steps, values[module][step])`` of the kept points, NaN where missing."""
        row = self.tracks.get(metric, {})
        modules = [m for m in self.modules() if m in row]
        steps = sorted({s for m in modules for s, _ in row[m].points})
        index = {s: i for i, s in enumerate(steps)}
        values = []
        for module in modules:
            line = [math.nan] * len(steps)
            for s, v in row[module].points:
                line[index[s]] = v
            values.append(line)
        return modules, steps, values
