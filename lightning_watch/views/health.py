"""The health report: one row per watched layer and the alerts with their hints.

Built from a :class:`~lightning_watch.views.history.History` and alert records (``Alert`` objects
or the dicts of ``alerts.jsonl``); rendered as a terminal table, Markdown, or JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_watch.alerts.alert import SEVERITIES, severity_rank
from lightning_watch.views.history import History

#: module types folded into the row of the layer that feeds them (they have no weights of their own)
ACTIVATIONS = frozenset(
    {
        "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
        "Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid", "Hardswish", "Softplus", "Softsign", "Tanhshrink",
        "LogSigmoid", "Threshold",
    }
)  # fmt: skip
#: what a report says when nothing was measured (never "healthy")
NOT_LOGGED = (
    "not checked: no logging step was reached, so no statistics were logged "
    "(for short runs pass `Watch(log_every_n_steps=10)`)"
)
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
    gradient or activation statistic was non-finite, else ``"ok"``. An activation that follows a
    layer (``fc1`` then its ReLU) shares that layer's row: ``modules`` lists both, ``types`` their
    types, and the row reads ``fc1 (Linear → ReLU)``; its gradient and update figures are the
    layer's, its activation RMS the layer's output (before the activation, where scale problems
    show), its dead fraction the activation's.
    """

    layer: str
    type: str | None = None
    grad_norm: float | None = None
    grad_norm_max: float | None = None
    update_ratio: float | None = None
    act_rms: float | None = None
    dead_frac: float | None = None
    nonfinite: int = 0
    status: str = "ok"
    last_step: int = -1
    modules: list[str] = field(default_factory=list)
    types: list[str | None] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``fc1 (Linear → ReLU)``, ``fc2 (Linear)``, or the bare name when the type is unknown."""
        known = [t for t in self.types if t]
        return f"{self.layer} ({' → '.join(known)})" if known else self.layer


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
    checked: bool = True
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        history: History,
        alerts: list[Any] = (),
        run: str | None = None,
        types: dict[str, str] | None = None,
        notes: list[str] = (),
        not_checked: str | None = None,
    ) -> HealthReport:
        """The report of ``history`` and ``alerts``.

        Args:
            types: ``module -> type name`` (e.g. ``"Linear"``); with it an activation joins the row
                of the layer that feeds it.
            notes: lines saying how the verdict was reached (e.g. re-diagnosed offline).
            not_checked: why nothing could be judged; when no statistic was logged at all a
                default reason is given. Such a report is never "healthy".
        """
        records = [alert_record(a) for a in alerts]
        types = dict(types or {})
        worst: dict[str | None, str] = {}
        for rec in records:
            sev = rec.get("severity", "warning")
            key = rec.get("module")
            if _rank(sev, unknown=1) > _rank(worst.get(key, "ok")):
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
                    type=types.get(module),
                    modules=[module],
                    types=[types.get(module)],
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
        if types:
            rows = _fold(rows)
        if not_checked is None and history.last_step < 0:
            not_checked = NOT_LOGGED
        return cls(
            rows=rows,
            alerts=records,
            last_step=history.last_step,
            run=run,
            checked=not_checked is None,
            notes=[*notes] if not_checked is None else [not_checked, *notes],
        )

    @property
    def healthy(self) -> bool | None:
        """No warning/error alert and no sick layer; ``None`` when nothing was checked."""
        if not self.checked and not any(a.get("severity") in ("warning", "error") for a in self.alerts):
            return None
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
        cells = [row.label]
        cells += [_fmt(values[key]) for key, _ in _COLUMNS[1:-1]]
        cells.append(MARKS.get(row.status, row.status))
        return cells

    def _alert_lines(self, markdown: bool) -> list[str]:
        lines = []
        for a in self.alerts:
            where = f" in {a['module']}" if a.get("module") else ""
            found = " (found offline)" if a.get("source") == "offline" else ""
            head = f"[{a.get('severity', '?')}] {a.get('code', '?')}{where} at step {a.get('step', '?')}{found}"
            if markdown:
                head = (
                    f"- **{a.get('severity', '?')}** `{a.get('code', '?')}`"
                    + (f" in `{a['module']}`" if a.get("module") else "")
                    + f" at step {a.get('step', '?')}{found}"
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
        lines += ["", *self._verdict()]
        return "\n".join(lines)

    def _verdict(self) -> list[str]:
        if not self.checked:
            return [self.notes[0][0].upper() + self.notes[0][1:], *self.notes[1:]]
        if self.alerts:
            return list(self.notes)
        return ["no alerts" + (" - healthy" if self.healthy else ""), *self.notes]

    def to_markdown(self) -> str:
        """The same report as a Markdown table (TensorBoard's Text tab, ``health.md``)."""
        lines = [f"**{self._headline()}**", ""]
        lines.append("| " + " | ".join(title for _, title in _COLUMNS) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|")
        for r in self.rows:
            cells = self._cells(r)
            cells[0] = f"`{r.layer}`" + (f" ({' → '.join(t for t in r.types if t)})" if any(r.types) else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if not self.checked:
            lines += [f"**{self._verdict()[0]}**", *self._verdict()[1:]]
        else:
            lines += self._alert_lines(markdown=True) or ["No alerts."]
            lines += [f"*{note}*" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite numbers become ``None``; ``nonfinite`` counts them)."""
        rows = []
        for r in self.rows:
            d = asdict(r)
            for key in ("grad_norm", "grad_norm_max", "update_ratio", "act_rms", "dead_frac"):
                d[key] = _num(d[key])
            d["label"] = r.label
            rows.append(d)
        return {
            "run": self.run,
            "last_step": self.last_step,
            "checked": self.checked,
            "healthy": self.healthy,
            "notes": self.notes,
            "layers": rows,
            "alerts": self.alerts,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _fold(rows: list[LayerRow]) -> list[LayerRow]:
    """Join each activation row to the row before it (the layer that feeds it, in forward order)."""
    out: list[LayerRow] = []
    for row in rows:
        prev = out[-1] if out else None
        if row.type in ACTIVATIONS and prev is not None and prev.type not in ACTIVATIONS and len(prev.modules) == 1:
            prev.modules.append(row.layer)
            prev.types.append(row.type)
            if prev.act_rms is None:
                prev.act_rms = row.act_rms
            if row.dead_frac is not None:
                prev.dead_frac = row.dead_frac
            prev.nonfinite += row.nonfinite
            if _rank(row.status) > _rank(prev.status):
                prev.status = row.status
            prev.last_step = max(prev.last_step, row.last_step)
            continue
        out.append(row)
    return out


def _rank(severity: str, unknown: int = -1) -> int:
    """:func:`~lightning_watch.alerts.alert.severity_rank`, with "ok" (and anything unknown) below every severity."""
    return severity_rank(severity) if severity in SEVERITIES else unknown
