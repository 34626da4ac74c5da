"""Pictures for TensorBoard's Images tab: layer x step heat maps and a gradient-flow bar chart.

matplotlib is optional (``pip install matplotlib``; ``pip install -e ".[plots]"`` in a clone): it is imported lazily,
and without it :func:`render_pictures` warns once and draws nothing. Figures are drawn on a bare
``matplotlib.figure.Figure`` with the Agg canvas, so pyplot's global state (the user's backend,
open figures) is never touched.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_watch.views.history import History
from lightning_watch.warn import warn_once

#: Image tags written to TensorBoard.
IMAGE_TAGS = {
    "dead_frac": "watch_pictures/dead_frac_heatmap",
    "update_ratio": "watch_pictures/update_ratio_heatmap",
    "grad_flow": "watch_pictures/grad_flow",
}


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported, without importing it (that alone takes 0.1-0.3 s)."""
    import importlib.util
    import sys

    if "matplotlib" in sys.modules:
        return sys.modules["matplotlib"] is not None  # None: an import known to fail
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def _canvas(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    return fig


#: inches per character of a 7-point tick label (Agg's DejaVu Sans averages about 0.55 em)
_CHAR_IN = 7 * 0.55 / 72


def _margins(fig, left_in: float, bottom_in: float, right_in: float = 0.2, top_in: float = 0.35) -> None:
    """Fixed margins from the label lengths: ``tight_layout`` measured every tick label's extent
    and took half the drawing time (0.1-0.5 s per set of pictures)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=min(0.6, left_in / width),
        right=1 - min(0.3, right_in / width),
        bottom=min(0.6, bottom_in / height),
        top=1 - min(0.3, top_in / height),
    )


def _to_array(fig) -> Any:
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3) uint8


def heatmap(history: History, metric: str, log_scale: bool = False) -> Any | None:
    """RGB array (H, W, 3) of ``metric`` as layers (rows, forward order) x logging steps; ``None`` if empty.

    Example:
        >>> h = History()
        >>> for step in range(3):
        ...     h.add("dead_frac", "fc1", step, step / 4); h.add("dead_frac", "fc2", step, 0.0)
        >>> image = heatmap(h, "dead_frac")
        >>> image.ndim, image.shape[2], str(image.dtype)
        (3, 3, 'uint8')
    """
    import numpy as np

    modules, steps, values = history.matrix(metric)
    if not modules or not steps:
        return None
    data = np.array(values, dtype=float)
    norm = None
    if log_scale:
        from matplotlib.colors import LogNorm

        positive = data[np.isfinite(data) & (data > 0)]
        if positive.size:
            lo, hi = float(positive.min()), float(positive.max())
            norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
        data = np.where(data > 0, data, np.nan)
    fig = _canvas(8, 1.2 + 0.3 * len(modules))
    ax = fig.add_subplot()
    kwargs = {"norm": norm} if norm is not None else {"vmin": 0.0, "vmax": 1.0} if metric == "dead_frac" else {}
    mesh = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap="viridis", **kwargs)
    ax.set_yticks(range(len(modules)), modules, fontsize=7)
    ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 6))})
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(f"{metric} per layer" + (" (log scale)" if log_scale else ""), fontsize=9)
    fig.colorbar(mesh, ax=ax)
    _margins(fig, left_in=0.2 + _CHAR_IN * max(len(m) for m in modules), bottom_in=0.45, right_in=0.1)
    return _to_array(fig)


def grad_flow(history: History) -> Any | None:
    """RGB array of the last gradient norm per layer (forward order, log scale); ``None`` if empty.

    Vanishing gradients show as bars shrinking towards the input; exploding ones as bars growing.
    """
    rows = [(m, history.track("grad_norm", m)) for m in history.modules()]
    rows = [(m, t.last, t.max) for m, t in rows if t is not None]
    if not rows:
        return None
    fig = _canvas(max(4, 0.5 * len(rows) + 2), 3.5)
    ax = fig.add_subplot()
    xs = range(len(rows))
    finite = [v if math.isfinite(v) and v > 0 else float("nan") for _, v, _ in rows]
    peaks = [v if math.isfinite(v) and v > 0 else float("nan") for _, _, v in rows]
    ax.bar(xs, peaks, color="lightgray", label="max so far")
    ax.bar(xs, finite, color="tab:blue", width=0.5, label="last")
    if any(math.isfinite(v) for v in finite + peaks):
        ax.set_yscale("log")
    ax.set_xticks(list(xs), [m for m, _, _ in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("gradient norm")
    ax.set_title(f"gradient flow (forward order), step {history.last_step}", fontsize=9)
    ax.legend(fontsize=7)
    longest = max(len(m) for m, _, _ in rows)
    _margins(fig, left_in=0.65, bottom_in=0.25 + _CHAR_IN * longest * math.sin(math.radians(60)))
    return _to_array(fig)


def render_pictures(history: History) -> dict[str, Any]:
    """``tag -> RGB array`` for every picture that has data; empty (one warning) without matplotlib."""
    if not matplotlib_available():
        warn_once(
            "views.no_matplotlib",
            "lightning_watch pictures need matplotlib (`pip install matplotlib`); "
            "the health report and every scalar are still written.",
        )
        return {}
    pictures = {
        IMAGE_TAGS["dead_frac"]: heatmap(history, "dead_frac"),
        IMAGE_TAGS["update_ratio"]: heatmap(history, "update_ratio", log_scale=True),
        IMAGE_TAGS["grad_flow"]: grad_flow(history),
    }
    return {tag: image for tag, image in pictures.items() if image is not None}
