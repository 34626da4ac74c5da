"""Where do two runs of the same model part ways? Step-by-step comparison of their logged statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lightning_watch.snapshot import parse_tag


def split_tag(tag: str) -> tuple[str, str | None]:
    """``(metric, module)`` of a ``watch/...`` tag (module ``None`` for global), ``(tag, None)`` otherwise.

    Example:
        >>> split_tag("watch/grad_norm/net.0"), split_tag("watch/global/grad_norm"), split_tag("train_loss")
        (('grad_norm', 'net.0'), ('grad_norm', None), ('train_loss', None))
    """
    parsed = parse_tag(tag)  # the current `watch.<metric>/<NN>.<module>` layout or the older one
    return parsed if parsed is not None else (tag, None)


def relative_gap(a: float, b: float, atol: float) -> float:
    """``|a - b| / max(|a|, |b|, atol)``; ``inf`` when exactly one is non-finite, 0 when both are."""
    if not (math.isfinite(a) and math.isfinite(b)):
        same = (math.isnan(a) and math.isnan(b)) or a == b
        return 0.0 if same else math.inf
    return abs(a - b) / max(abs(a), abs(b), atol)


@dataclass
class RunDiff:
    """Comparison of two runs.

    Attributes:
        first_step: first logging step where some statistic differs by more than ``rtol`` (``None``: never).
        at_first_step: ``(tag, a, b, gap)`` at that step, largest relative gap first.
        first_by_layer: ``module -> (first step, metric)`` where each layer first diverged, earliest first.
        final: ``tag -> (a, b)`` last common value of every scalar that is not a per-layer statistic (losses...).
        only_a, only_b: tags logged by one run only.
        compared_steps: number of common (tag, step) points compared.
    """

    run_a: str
    run_b: str
    rtol: float
    first_step: int | None = None
    at_first_step: list[tuple[str, float, float, float]] = field(default_factory=list)
    first_by_layer: dict[str, tuple[int, str]] = field(default_factory=dict)
    final: dict[str, tuple[float, float]] = field(default_factory=dict)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    compared_steps: int = 0

    @property
    def identical(self) -> bool:
        return self.first_step is None and not self.only_a and not self.only_b

    def to_dict(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {
            "run_a": self.run_a,
            "run_b": self.run_b,
            "rtol": self.rtol,
            "compared_points": self.compared_steps,
            "first_divergent_step": self.first_step,
            "at_first_step": [
                {"tag": t, "a": num(a), "b": num(b), "relative_gap": num(g)} for t, a, b, g in self.at_first_step
            ],
            "first_divergence_by_layer": [
                {"layer": m, "step": s, "metric": metric} for m, (s, metric) in self.first_by_layer.items()
            ],
            "final": {t: {"a": num(a), "b": num(b)} for t, (a, b) in self.final.items()},
            "only_in_a": self.only_a,
            "only_in_b": self.only_b,
        }

    def to_text(self, limit: int = 12) -> str:
        lines = [f"lightning_watch diff (rtol={self.rtol:g})", f"  A: {self.run_a}", f"  B: {self.run_b}"]
        if self.first_step is None:
            lines.append(f"no statistic differs by more than rtol over {self.compared_steps} common points")
        else:
            lines.append(f"first divergent step: {self.first_step}")
            lines.append("  at that step (largest gap first):")
            for tag, a, b, gap in self.at_first_step[:limit]:
                lines.append(f"    {tag:<40} A={a:<11.4g} B={b:<11.4g} gap={gap:.3g}")
            if len(self.at_first_step) > limit:
                lines.append(f"    ... and {len(self.at_first_step) - limit} more")
            lines.append("  first divergence per layer (earliest first):")
            for module, (step, metric) in self.first_by_layer.items():
                lines.append(f"    {module:<30} step {step:<8} ({metric})")
        if self.final:
            lines.append("  last common values:")
            for tag, (a, b) in self.final.items():
                lines.append(f"    {tag:<40} A={a:<11.4g} B={b:.4g}")
        for name, tags in (("only in A", self.only_a), ("only in B", self.only_b)):
            if tags:
                shown = ", ".join(tags[:limit]) + (" ..." if len(tags) > limit else "")
                lines.append(f"  {name}: {shown}")
        return "\n".join(lines)


def diff_scalars(
    a: dict[str, list[tuple[int, float]]],
    b: dict[str, list[tuple[int, float]]],
    rtol: float = 1e-3,
    atol: float = 1e-12,
    run_a: str = "A",
    run_b: str = "B",
) -> RunDiff:
    """Compare ``tag -> [(step, value)]`` of two runs on their common tags and steps.

    Raises:
        ValueError: if ``rtol`` is negative or not a number.

    Example:
        >>> a = {"watch/grad_norm/fc1": [(0, 1.0), (1, 2.0)], "watch/grad_norm/fc2": [(0, 1.0), (1, 1.0)]}
        >>> b = {"watch/grad_norm/fc1": [(0, 1.0), (1, 3.0)], "watch/grad_norm/fc2": [(0, 1.0), (1, 1.0)]}
        >>> d = diff_scalars(a, b, rtol=0.01)
        >>> d.first_step, d.first_by_layer
        (1, {'fc1': (1, 'grad_norm')})
    """
    if not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not rtol >= 0:
        raise ValueError(f"`rtol` must be a non-negative number, got {rtol!r}.")
    result = RunDiff(run_a=run_a, run_b=run_b, rtol=float(rtol))
    common = [t for t in a if t in b]
    result.only_a = [t for t in a if t not in b]
    result.only_b = [t for t in b if t not in a]
    # step -> [(tag, a, b, gap)] of every divergent point
    divergent: dict[int, list[tuple[str, float, float, float]]] = {}
    first: dict[str, tuple[int, float, str]] = {}  # module -> (step, gap, metric)
    for tag in common:
        vb = dict(b[tag])
        metric, module = split_tag(tag)
        last_common = None
        for step, va in a[tag]:
            if step not in vb:
                continue
            result.compared_steps += 1
            last_common = (va, vb[step])
            gap = relative_gap(va, vb[step], atol)
            if gap > rtol:
                divergent.setdefault(step, []).append((tag, va, vb[step], gap))
                if module is not None:  # the layer's earliest step, and there its most different metric
                    seen = first.get(module)
                    if seen is None or (step, -gap) < (seen[0], -seen[1]):
                        first[module] = (step, gap, metric)
        if (module is None and parse_tag(tag) is None) and last_common is not None:
            result.final[tag] = last_common
    if divergent:
        result.first_step = min(divergent)
        result.at_first_step = sorted(divergent[result.first_step], key=lambda r: -r[3])
    ordered = sorted(first.items(), key=lambda kv: kv[1][0])  # stable: forward order within a step
    result.first_by_layer = {module: (step, metric) for module, (step, _gap, metric) in ordered}
    return result
