"""The plain-float picture of one logging step, shared by writers and alert rules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Prefix of every scalar tag lightning_watch writes.
TAG_PREFIX = "watch"


def scalar_tag(metric: str, module: str | None = None) -> str:
    """``watch/<metric>/<module>`` for a per-module value, ``watch/global/<metric>`` otherwise.

    Example:
        >>> scalar_tag("grad_norm", "encoder.fc1"), scalar_tag("grad_norm")
        ('watch/grad_norm/encoder.fc1', 'watch/global/grad_norm')
    """
    return f"{TAG_PREFIX}/global/{metric}" if module is None else f"{TAG_PREFIX}/{metric}/{module}"


@dataclass
class Snapshot:
    """Statistics of one logging step, as host floats, identical on every rank.

    Attributes:
        step: Lightning's logging step (the x-axis of ``self.log`` curves).
        epoch: current epoch.
        per_module: ``metric -> {module name -> value}``, modules in registration order.
        global_: ``metric -> value`` for whole-model quantities.
        final: true for the read at the end of fit (a partial window).

    Example:
        >>> snap = Snapshot(step=49, epoch=0)
        >>> snap.put("dead_frac", 0.25, module="fc1")
        >>> snap.put("grad_norm", 1.5)
        >>> snap.scalars()
        {'watch/dead_frac/fc1': 0.25, 'watch/global/grad_norm': 1.5}
    """

    step: int
    epoch: int
    per_module: dict[str, dict[str, float]] = field(default_factory=dict)
    global_: dict[str, float] = field(default_factory=dict)
    #: the read at the end of fit: the last window, possibly shorter than the logging interval
    final: bool = False

    def put(self, metric: str, value: float, module: str | None = None) -> None:
        if module is None:
            self.global_[metric] = float(value)
        else:
            self.per_module.setdefault(metric, {})[module] = float(value)

    def get(self, metric: str, module: str | None = None, default: float = math.nan) -> float:
        if module is None:
            return self.global_.get(metric, default)
        return self.per_module.get(metric, {}).get(module, default)

    def modules(self, metric: str) -> dict[str, float]:
        """``{module: value}`` for ``metric`` (empty if not measured this step)."""
        return self.per_module.get(metric, {})

    def scalars(self) -> dict[str, float]:
        """Every value under its TensorBoard tag."""
        out = {
            scalar_tag(metric, module): value
            for metric, row in self.per_module.items()
            for module, value in row.items()
        }
        out.update({scalar_tag(metric): value for metric, value in self.global_.items()})
        return out
