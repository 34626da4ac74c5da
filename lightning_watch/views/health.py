"""The health report: one row per watched layer and the alerts with their hints.

Built from a :class:`~lightning_watch.views.history.History` and alert records (``Alert`` objects
or the dicts of ``alerts.jsonl``); rendered as a terminal table, Markdown, or JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_watch.views.history import History

_SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}
#: status marks, best to worst (ASCII: terminals and log files of every encoding read them)
MARKS = {"ok": "ok", "info": "info", "warning": "WARN", "error": "SICK"}

_COLUMNS = (
    ("layer", "layer"),
    ("grad_norm", "grad last"),
    ("grad_norm_max", "grad max"),
    ("update_ratio", "update ratio"),
    ("act_rms", "act rms"),
    ("dead_frac", "dead frac"),
    ("status", "status"),
)


def alert_record(alert: Any) -> dict[str, Any]:
    """An alert as a plain dict (``Alert`` objects, dataclasses and dicts are accepted)."""
    if isinstance(alert, dict):
        return dict(alert)
    to_json = getattr(alert, "to_json", None)
    if callable(to_json):
        return json.loads(to_json())
    try:
        return asdict(alert)
    except TypeError:
        return {k: getattr(alert, k, None) for k in ("code", "severity", "step", "epoch", "module", "message", "hint")}


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"


@dataclass
class LayerRow:
    """One watched layer: last/extreme statistics and its status.

    ``status`` is the worst severity among the alerts naming this layer, ``"error"`` if any
    gradient or activation statistic was non-finite, else ``"ok"``.
    """

    layer: str
    grad_norm: float | None = None
    grad_norm_max: float | None = None
    update_ratio: float | None = None
    act_rms: float | None = None
    dead_frac: float | None = None
    nonfinite: int = 0
    status: str = "ok"
    last_step: int = -1


@dataclass
class HealthReport:
    """The end-of-fit picture of a run: rows per layer plus alerts.

    Attributes:
        rows: one :class:`LayerRow` per watched layer, in forward (registration) order.
        alerts: alert records (dicts), in the order raised.
        last_step: last logging step seen.
        run: name of the run (a directory for the command line).

    Example:
        >>> from lightning_watch.views.history import History
        >>> h = History()
        >>> h.add("grad_norm", "fc1", 9, 0.5); h.add("dead_frac", "fc1", 9, 0.75)
        >>> report = HealthReport.build(h, [{"code": "dead_units", "severity": "warning", "step": 9,
        ...                                  "module": "fc1", "message": "75% dead.", "hint": "Lower the lr."}])
        >>> report.rows[0].status, report.healthy
        ('warning', False)
        >>> print(report.to_text().splitlines()[0])
        lightning_watch health report: 1 layer, last step 9, 1 alert
    """

    rows: list[LayerRow] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    last_step: int = -1
    run: str | None = None

    @classmethod
    def build(cls, history: History, alerts: list[Any] = (), run: str | None = None) -> HealthReport:
        records = [alert_record(a) for a in alerts]
        worst: dict[str | None, str] = {}
        for rec in records:
            sev = rec.get("severity", "warning")
            key = rec.get("module")
            if _SEVERITY_RANK.get(sev, 1) > _SEVERITY_RANK.get(worst.get(key, "ok"), -1):
                worst[key] = sev
        rows = []
        for module in history.modules():

            def last(metric: str, module: str = module) -> float | None:
                track = history.track(metric, module)
                return None if track is None else track.last

            grad = history.track("grad_norm", module)
            nonfinite = sum(t.nonfinite for t in (history.track(m, module) for m in history.metrics) if t is not None)
            status = worst.get(module, "ok")
            if nonfinite:
                status = "error"
            rows.append(
                LayerRow(
                    layer=module,
                    grad_norm=last("grad_norm"),
                    grad_norm_max=None if grad is None or grad.max == -math.inf else grad.max,
                    update_ratio=last("update_ratio"),
                    act_rms=last("act_rms"),
                    dead_frac=last("dead_frac"),
                    nonfinite=nonfinite,
                    status=status,
                    last_step=max(
                        (t.last_step for t in (history.track(m, module) for m in history.metrics) if t is not None),
                        default=-1,
                    ),
                )
            )
        return cls(rows=rows, alerts=records, last_step=history.last_step, run=run)

    @property
    def healthy(self) -> bool:
        """No warning/error alert and no sick layer."""
        return all(r.status in ("ok", "info") for r in self.rows) and not any(
            a.get("severity") in ("warning", "error") for a in self.alerts
        )

    # ------------------------------------------------------------------ rendering
    def _headline(self) -> str:
        n, a = len(self.rows), len(self.alerts)
        run = f" [{self.run}]" if self.run else ""
        return (
            f"lightning_watch health report{run}: {n} layer{'s' * (n != 1)}, last step {self.last_step}, "
            f"{a} alert{'s' * (a != 1)}"
        )

    def _cells(self, row: LayerRow) -> list[str]:
        values = asdict(row)
        cells = [row.layer]
        cells += [_fmt(values[key]) for key, _ in _COLUMNS[1:-1]]
        cells.append(MARKS.get(row.status, row.status))
        return cells

    def _alert_lines(self, markdown: bool) -> list[str]:
        lines = []
        for a in self.alerts:
            where = f" in {a['module']}" if a.get("module") else ""
            head = f"[{a.get('severity', '?')}] {a.get('code', '?')}{where} at step {a.get('step', '?')}"
            if markdown:
                head = (
                    f"- **{a.get('severity', '?')}** `{a.get('code', '?')}`"
                    + (f" in `{a['module']}`" if a.get("module") else "")
                    + f" at step {a.get('step', '?')}"
                )
            lines.append(f"{head}: {a.get('message', '')}")
            if a.get("hint"):
                lines.append(f"    hint: {a['hint']}" if not markdown else f"  - *hint*: {a['hint']}")
        return lines

    def to_text(self) -> str:
        """A compact fixed-width table, then the alerts with hints."""
        header = [title for _, title in _COLUMNS]
        body = [self._cells(r) for r in self.rows]
        widths = [max(len(c) for c in col) for col in zip(header, *body)]

        def fmt(cells):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        lines = [self._headline(), fmt(header), "  ".join("-" * w for w in widths)]
        lines += [fmt(c) for c in body]
        if self.alerts:
            lines += ["", "alerts:"] + ["  " + line for line in self._alert_lines(markdown=False)]
        else:
            lines += ["", "no alerts" + (" - healthy" if self.healthy else "")]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The same report as a Markdown table (TensorBoard's Text tab, ``health.md``)."""
        lines = [f"**{self._headline()}**", ""]
        lines.append("| " + " | ".join(title for _, title in _COLUMNS) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|")
        for r in self.rows:
            cells = self._cells(r)
            cells[0] = f"`{cells[0]}`"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += self._alert_lines(markdown=True) or ["No alerts."]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite numbers become ``None``; ``nonfinite`` counts them)."""
        rows = []
        for r in self.rows:
            d = asdict(r)
            for key in ("grad_norm", "grad_norm_max", "update_ratio", "act_rms", "dead_frac"):
                d[key] = _num(d[key])
            rows.append(d)
        return {
            "run": self.run,
            "last_step": self.last_step,
            "healthy": self.healthy,
            "layers": rows,
            "alerts": self.alerts,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
