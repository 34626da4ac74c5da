"""What ``Watch`` does with its snapshots for the views: keep a bounded history, draw, report at the end."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import lightning.pytorch as pl

from lightning_watch.tensorboard import add_text, logger_target, run_log_dir, tensorboard_loggers
from lightning_watch.views.health import HealthReport
from lightning_watch.views.history import History
from lightning_watch.views.images import render_pictures
from lightning_watch.warn import warn_once, warn_write_failed

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
            30 s of training; the end-of-fit pictures are always drawn).
        history: points kept per layer and metric (bounds memory).

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
    ) -> None:
        if report is not None and not isinstance(report, bool):
            raise ValueError(f"`report` must be True, False or None, got {report!r}.")
        if not isinstance(pictures, bool):
            raise ValueError(f"`pictures` must be True or False, got {pictures!r}.")
        if not isinstance(picture_every, int) or isinstance(picture_every, bool) or picture_every < 1:
            raise ValueError(f"`picture_every` must be a positive int, got {picture_every!r}.")
        if isinstance(picture_budget, bool) or not isinstance(picture_budget, (int, float)) or picture_budget <= 0:
            raise ValueError(f"`picture_budget` must be a positive share such as 0.01, got {picture_budget!r}.")
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
            self.last_report = HealthReport.build(self.history, alerts)
            if not trainer.is_global_zero:
                return
            if self.pictures:
                self._draw(trainer, max(self.history.last_step, 0))
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
    def _within_budget(self) -> bool:
        # the cost of the draw about to happen counts too: otherwise the first set of pictures
        # would be free, and on a short run it alone costs more than the whole budget
        elapsed = time.perf_counter() - getattr(self, "_started", time.perf_counter())
        spent = getattr(self, "_drawing", 0.0) + getattr(self, "_next_draw", FIRST_DRAW_ESTIMATE_S)
        return spent <= self.picture_budget * elapsed

    def _draw(self, trainer: pl.Trainer, step: int) -> None:
        if not trainer.is_global_zero or not tensorboard_loggers(trainer):
            return
        for tag, image in render_pictures(self.history).items():
            for logger in tensorboard_loggers(trainer):
                try:
                    logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
                except Exception as err:  # pictures are optional; training and the report go on
                    warn_write_failed(f"{logger_target(logger)} (pictures)", err)

    def _write(self, trainer: pl.Trainer, log_dir: str | None, report: HealthReport) -> None:
        add_text(trainer, REPORT_TAG, report.to_markdown(), max(report.last_step, 0))
        for logger in tensorboard_loggers(trainer):
            try:
                logger.experiment.flush()
            except Exception as err:
                warn_write_failed(logger_target(logger), err)
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
