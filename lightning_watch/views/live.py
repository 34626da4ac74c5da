"""What ``Watch`` does with its snapshots for the views: keep a bounded history, draw, report at the end."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import lightning.pytorch as pl

from lightning_watch.views.health import HealthReport
from lightning_watch.views.history import History
from lightning_watch.views.images import matplotlib_available, render_pictures
from lightning_watch.warn import warn_once, warn_write_failed
from lightning_watch.writers import add_images, add_text, flush, run_log_dir, writers

#: TensorBoard text tag of the end-of-fit report.
REPORT_TAG = "watch_report/health"
HEALTH_MD = "health.md"
HEALTH_JSON = "health.json"


#: expected seconds for the first set of periodic pictures (matplotlib, measured 0.3-0.7 s on 2 CPU cores)
FIRST_DRAW_ESTIMATE_S = 0.3


class WatchViews:
    """The views part of a :class:`~lightning_watch.Watch`: history, pictures, end-of-fit report.

    Args:
        report: print the report at the end of fit; ``None`` follows the Trainer's progress bar
            (printed when ``enable_progress_bar=True``). ``health.md``/``health.json`` (in the
            log directory, when the Trainer has a logger) and TensorBoard text are written either
            way, on rank zero.
        pictures: draw the heat maps and gradient-flow chart into TensorBoard (needs matplotlib).
        picture_every: draw every this many logging publications (and once at the end of fit).
        picture_budget: largest share of the fit's wall time that periodic drawing may take; a due
            picture is skipped unless drawing it (estimated from the last one) keeps the total
            within the share (matplotlib takes a few tenths of a second per set of pictures, many
            training steps of a small model: at 1 %, the first periodic pictures come after about
            30 s of training). The end-of-fit pictures count against the same budget.
        history: points kept per layer and metric (bounds memory).
        final_pictures: ``None`` draws the end-of-fit pictures when they fit the budget (a short
            fit skips them, and its report says so); ``True`` always draws them; ``False`` never.

    Raises:
        ValueError: for a non-bool ``report``/``pictures`` or a non-positive ``picture_every``.

    Example:
        >>> views = WatchViews(report=False, picture_every=20)
        >>> views.history.maxlen
        256
    """

    def __init__(
        self,
        report: bool | None = None,
        pictures: bool = True,
        picture_every: int = 10,
        history: int = 256,
        picture_budget: float = 0.01,
        final_pictures: bool | None = None,
    ) -> None:
        if report is not None and not isinstance(report, bool):
            raise ValueError(f"`report` must be True, False or None, got {report!r}.")
        if not isinstance(pictures, bool):
            raise ValueError(f"`pictures` must be True or False, got {pictures!r}.")
        if not isinstance(picture_every, int) or isinstance(picture_every, bool) or picture_every < 1:
            raise ValueError(f"`picture_every` must be a positive int, got {picture_every!r}.")
        if isinstance(picture_budget, bool) or not isinstance(picture_budget, (int, float)) or picture_budget <= 0:
            raise ValueError(f"`picture_budget` must be a positive share such as 0.01, got {picture_budget!r}.")
        if final_pictures is not None and not isinstance(final_pictures, bool):
            raise ValueError(f"`final_pictures` must be True, False or None, got {final_pictures!r}.")
        self.final_pictures = final_pictures
        self.picture_budget = float(picture_budget)
        self.report = report
        self.pictures = pictures
        self.picture_every = picture_every
        self.history = History(maxlen=history)
        self.last_report: HealthReport | None = None
        self._published = 0

    def reset(self) -> None:
        self.history = History(maxlen=self.history.maxlen)
        self._published = 0
        self._started = time.perf_counter()
        self._drawing = 0.0  # seconds spent drawing periodic pictures in this fit
        self._next_draw = FIRST_DRAW_ESTIMATE_S  # expected cost of the next set of pictures

    # ------------------------------------------------------------------ hooks (never raise into training)
    def on_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: Any) -> None:
        try:
            if getattr(snapshot, "final", False) and snapshot.step == self.history.last_step:
                return  # the end-of-fit re-judgement of the last logging step: no new point
            self.history.add_snapshot(snapshot)
            self._published += 1
            if self.pictures and self._published % self.picture_every == 0 and self._within_budget():
                begin = time.perf_counter()
                self._draw(trainer, snapshot.step)
                self._next_draw = time.perf_counter() - begin
                self._drawing += self._next_draw
        except Exception as err:  # a drawing failure must not stop training
            warn_once(("views.snapshot", type(err).__name__), f"lightning_watch views skipped a step: {err!r}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, alerts: list) -> None:
        try:
            log_dir = run_log_dir(trainer)  # a broadcast under DDP: every rank asks, rank zero writes
            drawn = self._final_pictures(trainer)
            self.last_report = HealthReport.build(
                self.history,
                alerts,
                run=log_dir or _run_name(trainer),
                types=_layer_types(pl_module, self.history),
                notes=[] if drawn is None else [drawn],
            )
            if not trainer.is_global_zero:
                return
            self._write(trainer, log_dir, self.last_report)
            show = self.report if self.report is not None else trainer.progress_bar_callback is not None
            if show:
                print("\n" + self.last_report.to_text(), file=sys.stdout, flush=True)
        except Exception as err:
            warn_once(("views.report", type(err).__name__), f"lightning_watch could not write its report: {err!r}")
        finally:
            _wait_for_rank_zero(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, alerts: list) -> None:
        """Fit failed (e.g. an alert's ``"raise"`` action): still leave the report, single-process only.

        Under DDP the other ranks may be anywhere, and resolving the log directory is a collective.
        """
        if getattr(trainer, "world_size", 1) == 1:
            self.on_train_end(trainer, pl_module, alerts)

    # ------------------------------------------------------------------ helpers
    def _final_pictures(self, trainer: pl.Trainer) -> str | None:
        """Draw the end-of-fit pictures if asked or within budget; a note for the report when skipped.

        On a short fit one set of pictures (~0.3 s of matplotlib) costs more than the whole fit's
        budget, so by default it is skipped there, like a periodic one would be.
        """
        if not self.pictures or self.final_pictures is False or self.history.last_step < 0:
            return None
        if not matplotlib_available():
            render_pictures(self.history)  # says once that pictures need matplotlib, draws nothing
            return None
        if self.final_pictures is None and not self._within_budget():
            elapsed = time.perf_counter() - getattr(self, "_started", time.perf_counter())
            cost = getattr(self, "_next_draw", FIRST_DRAW_ESTIMATE_S)
            return (
                f"end-of-fit pictures skipped: drawing them (~{cost:.1f} s) "
                f"would exceed {self.picture_budget:.0%} of this {elapsed:.1f} s fit; "
                "`Watch(final_pictures=True)` draws them anyway"
            )
        if trainer.is_global_zero:
            self._draw(trainer, max(self.history.last_step, 0))
        return None

    def _within_budget(self) -> bool:
        # the cost of the draw about to happen counts too: otherwise the first set of pictures
        # would be free, and on a short run it alone costs more than the whole budget
        elapsed = time.perf_counter() - getattr(self, "_started", time.perf_counter())
        spent = getattr(self, "_drawing", 0.0) + getattr(self, "_next_draw", FIRST_DRAW_ESTIMATE_S)
        return spent <= self.picture_budget * elapsed

    def _draw(self, trainer: pl.Trainer, step: int) -> None:
        if not trainer.is_global_zero or not any(w.shows_media for w in writers(trainer)):
            return
        add_images(trainer, render_pictures(self.history), step)

    def _write(self, trainer: pl.Trainer, log_dir: str | None, report: HealthReport) -> None:
        add_text(trainer, REPORT_TAG, report.to_markdown(), max(report.last_step, 0))
        flush(trainer)
        if log_dir:
            # each file on its own: a health.md that fails must not cost health.json
            for name, text in ((HEALTH_MD, report.to_markdown), (HEALTH_JSON, report.to_json)):
                path = os.path.join(log_dir, name)
                try:
                    os.makedirs(log_dir, exist_ok=True)
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(text() + "\n")
                except Exception as err:
                    warn_write_failed(path, err, "The report is still in TensorBoard's Text tab and `watch.views`.")


def _layer_types(pl_module: pl.LightningModule, history: History) -> dict[str, str]:
    """``module -> type name`` of the reported layers: the report joins an activation to its layer."""
    wanted = set(history.modules())
    named = getattr(pl_module, "named_modules", None)
    return {name: type(module).__name__ for name, module in named() if name in wanted} if named else {}


def _run_name(trainer: pl.Trainer) -> str | None:
    """The logger's run name and version (``lightning_logs/version_3``) when there is no log directory."""
    logger = getattr(trainer, "logger", None)
    if logger is None:
        return None
    version = getattr(logger, "version", None)
    version = version if isinstance(version, str) or version is None else f"version_{version}"
    return "/".join(str(part) for part in (getattr(logger, "name", None), version) if part) or None


def _wait_for_rank_zero(trainer: pl.Trainer) -> None:
    """Under DDP, keep the other ranks until rank zero has written the report and pictures.

    Rank zero's end-of-fit work takes a fraction of a second; a rank that leaves meanwhile and
    exits its process while its peer still holds the gloo connection was seen to abort at exit
    ("terminate called without an active exception", about one ``ddp_spawn`` fit in four, with
    bare Lightning too once rank zero lingers), which fails the user's ``trainer.fit``.
    """
    if getattr(trainer, "world_size", 1) <= 1:
        return
    try:
        trainer.strategy.barrier("lightning_watch.report")
    except Exception as err:  # a peer is gone: nothing to wait for
        warn_once(("views.barrier", type(err).__name__), f"lightning_watch could not wait for rank zero: {err!r}")
