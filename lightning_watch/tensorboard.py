"""Writing to loggers: scalars to every logger, layouts/histograms/text to TensorBoard.

Everything here runs on rank zero only and receives host values that were already read, so no
writer ever touches a device tensor's value (Lightning's loggers call ``.item()`` per tensor).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Mapping

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

from lightning_watch.snapshot import TAG_PREFIX, Snapshot
from lightning_watch.warn import warn_write_failed

#: Layout category under which TensorBoard's "Custom Scalars" tab groups our charts.
LAYOUT_CATEGORY = "lightning_watch"

# One merged layout per TensorBoard writer: each monitor adds its metrics, and the whole layout
# is rewritten, since TensorBoard keeps one layout per run.
_layouts: weakref.WeakKeyDictionary[object, dict[str, list]] = weakref.WeakKeyDictionary()


def run_log_dir(trainer: pl.Trainer) -> str | None:
    """The run's log directory for our files (``alerts.jsonl``, ``health.md``), or ``None``.

    Call it on every rank: ``trainer.log_dir`` is a broadcast under DDP. Without a real logger there
    is no run directory (with ``logger=False`` Lightning answers the working directory, under
    ``fast_dev_run`` a dummy logger's ``None``), and nothing should be written into the user's cwd.
    """
    log_dir = trainer.log_dir
    if not log_dir or not trainer.loggers or isinstance(trainer.loggers[0], DummyLogger):
        return None
    return log_dir


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_scalars(trainer: pl.Trainer, snapshot: Snapshot) -> None:
    """Send every scalar of ``snapshot`` to every attached logger, at Lightning's step."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    scalars = snapshot.scalars()
    if not scalars:
        return
    for logger in trainer.loggers:
        try:
            if isinstance(logger, TensorBoardLogger):
                _write_summary(logger, scalars, snapshot.step)
            else:
                logger.log_metrics(scalars, step=snapshot.step)
        except Exception as err:  # a failing logger costs its own output, never the run
            warn_write_failed(logger_target(logger), err)


def logger_target(logger: object) -> str:
    """What a failed write names: the logger's directory when it has one."""
    where = None
    with contextlib.suppress(Exception):  # some loggers compute their directory, and may fail too
        where = getattr(logger, "log_dir", None)
    return f"{type(logger).__name__} ({where})" if where else type(logger).__name__


def _write_summary(logger: TensorBoardLogger, scalars: Mapping[str, float], step: int) -> None:
    # One event holding every value: `add_scalar` per tag writes one event per value, which made
    # TensorBoard writing the largest cost of a logging step with many layers.
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()])
    logger.experiment._get_file_writer().add_summary(summary, step)


def add_layout(trainer: pl.Trainer, metrics: Iterable[str], global_metrics: Iterable[str] = ()) -> None:
    """Add one multi-line chart per metric (one line per module) to TensorBoard's custom scalars."""
    if not trainer.is_global_zero:
        return
    for logger in tensorboard_loggers(trainer):
        try:
            writer = logger.experiment
            charts = _layouts.setdefault(writer, {})
            for metric in metrics:
                charts[metric] = ["Multiline", [rf"^{TAG_PREFIX}/{metric}/"]]
            for metric in global_metrics:
                charts[f"global/{metric}"] = ["Multiline", [rf"^{TAG_PREFIX}/global/{metric}$"]]
            writer.add_custom_scalars({LAYOUT_CATEGORY: dict(charts)})
        except Exception as err:
            warn_write_failed(logger_target(logger), err)


def add_histograms(trainer: pl.Trainer, tensors: Mapping[str, Tensor], step: int) -> None:
    """Write ``tag -> tensor`` histograms (the tensor moves to the CPU here: histogram steps only)."""
    if not trainer.is_global_zero or not tensors:
        return
    for logger in tensorboard_loggers(trainer):
        try:
            for tag, tensor in tensors.items():
                logger.experiment.add_histogram(tag, tensor.detach().float().cpu(), global_step=step)
        except Exception as err:
            warn_write_failed(logger_target(logger), err)


def add_text(trainer: pl.Trainer, tag: str, text: str, step: int) -> None:
    """Write Markdown ``text`` under ``tag`` to TensorBoard's Text tab."""
    if not trainer.is_global_zero:
        return
    for logger in tensorboard_loggers(trainer):
        try:
            logger.experiment.add_text(tag, text, global_step=step)
        except Exception as err:
            warn_write_failed(logger_target(logger), err)
