"""Writing to loggers: one small writer per logger kind, behind one base class.

=================  =======  ==========================  ===============================  ==========
logger             scalars  text (alerts, the report)   pictures                         histograms
=================  =======  ==========================  ===============================  ==========
TensorBoard        yes      Text tab                    Images tab                       yes
W&B                yes      ``wandb.Html`` panels       ``wandb.Image``                  no
MLflow             yes      ``.md`` artifacts           ``.png`` artifacts               no
any other          yes      no                          no                               no
=================  =======  ==========================  ===============================  ==========

Everything here runs on rank zero only and receives host values that were already read, so no
writer ever touches a device tensor's value (Lightning's loggers call ``.item()`` per tensor).
A writer that fails says so once (:func:`~lightning_watch.warn.warn_once`) and never stops training.
"""

from __future__ import annotations

import contextlib
import html
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import DummyLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

from lightning_watch import fast_crc
from lightning_watch.snapshot import GLOBAL_SECTION, TAG_PREFIX, ModuleOrder, Snapshot, parse_tag
from lightning_watch.warn import warn_write_failed

#: Title of the Custom Scalars category holding the diagnostic charts (open); the rest is closed.
LAYOUT_CATEGORY = "lightning_watch"
LAYOUT_MORE = "lightning_watch: more"

#: Per-module metrics that lead the Custom Scalars tab: the ones alerts are about.
DIAGNOSTIC_METRICS = ("dead_frac", "grad_norm", "update_ratio", "act_saturated_frac", "act_nonfinite_frac")
#: Whole-model metrics shown with them.
DIAGNOSTIC_GLOBALS = ("loss", "grad_norm", "grad_nonfinite", "update_ratio")

#: Progress-bar key of :func:`progress_bar_metrics`.
PROGRESS_KEY = "watch_warnings"


class Writer:
    """What one logger shows of our values; this base writes scalars only (any Lightning logger).

    Subclasses add what their logger can show: text, pictures, histograms, a chart layout.

    Example:
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> writer = writer_for(CSVLogger("/tmp/lw-doctest"))
        >>> type(writer).__name__, writer.shows_media
        ('Writer', False)
    """

    #: whether :meth:`text` shows anything (a generic logger has no place for it)
    shows_media = False

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def scalars(self, scalars: Mapping[str, float], step: int) -> None:
        self.logger.log_metrics(dict(scalars), step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown ``text`` under ``tag`` (alerts, the health report)."""

    def images(self, images: Mapping[str, Any], step: int) -> None:
        """``tag -> HWC uint8 array`` pictures."""

    def histograms(self, tensors: Mapping[str, Tensor], step: int) -> None:
        """``tag -> tensor`` histograms."""

    def flush(self) -> None:
        """Make what was written visible now (end of fit)."""


class TensorBoardWriter(Writer):
    """Scalars in one event per step, the Custom Scalars layout, text, images, histograms."""

    shows_media = True

    def __init__(self, logger: TensorBoardLogger) -> None:
        super().__init__(logger)
        fast_crc.install()  # a C checksum for every event record, when a CRC32C package is installed
        self._tags: set[str] = set()  # every scalar tag written so far
        self._metrics: set[str] = set()  # per-module metrics already in the layout
        self._globals: set[str] = set()

    def scalars(self, scalars: Mapping[str, float], step: int) -> None:
        # One event holding every value: `add_scalar` per tag writes one event per value, which made
        # TensorBoard writing the largest cost of a logging step with many layers.
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()])
        self.logger.experiment._get_file_writer().add_summary(summary, step)
        self._extend_layout(scalars)

    def text(self, tag: str, text: str, step: int) -> None:
        self.logger.experiment.add_text(tag, text, global_step=step)

    def images(self, images: Mapping[str, Any], step: int) -> None:
        for tag, image in images.items():
            self.logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")

    def histograms(self, tensors: Mapping[str, Tensor], step: int) -> None:
        for tag, tensor in tensors.items():
            self.logger.experiment.add_histogram(tag, tensor.detach().float().cpu(), global_step=step)

    def flush(self) -> None:
        self.logger.experiment.flush()

    def _extend_layout(self, scalars: Iterable[str]) -> None:
        # The layout follows the tags actually written, so no chart ever matches nothing
        # ("Matches (0)"); TensorBoard shows the last layout written, so it is rewritten whole.
        new = set(scalars).difference(self._tags)  # one set operation: the same tags at every step after the first
        if not new:
            return  # every logging step after the first: nothing to parse
        self._tags.update(new)
        metrics, globals_ = set(self._metrics), set(self._globals)
        for tag in new:
            parsed = parse_tag(tag)
            if parsed is not None:
                (metrics if parsed[1] is not None else globals_).add(parsed[0])
        if metrics == self._metrics and globals_ == self._globals:
            return
        self._metrics, self._globals = metrics, globals_
        self.logger.experiment._get_file_writer().add_summary(layout_summary(metrics, globals_))


def layout_summary(metrics: Iterable[str], global_metrics: Iterable[str] = ()) -> Summary:
    """The Custom Scalars layout: diagnostic charts first (open), every other metric in a closed category.

    One chart per per-module metric, one line per module; the tooltip names each line by its tag,
    which ends with the module. TensorBoard's layout has no setting for outlier clipping (a
    dashboard checkbox, "Ignore outliers in chart scaling"), so the README says to untick it.

    Example:
        >>> from tensorboard.plugins.custom_scalar import layout_pb2
        >>> summary = layout_summary(["act_rms", "grad_norm", "dead_frac"], ["loss"])
        >>> layout = layout_pb2.Layout.FromString(summary.value[0].tensor.string_val[0])
        >>> for category in layout.category:
        ...     print(category.title, category.closed, [chart.title for chart in category.chart])
        lightning_watch False ['dead_frac', 'grad_norm', 'global/loss']
        lightning_watch: more True ['act_rms']
    """
    from tensorboard.compat.proto.summary_pb2 import SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    metrics, global_metrics = set(metrics), set(global_metrics)

    def per_module(metric: str) -> layout_pb2.Chart:
        pattern = rf"^{re.escape(f'{TAG_PREFIX}.{metric}')}/"
        return layout_pb2.Chart(title=metric, multiline=layout_pb2.MultilineChartContent(tag=[pattern]))

    def whole(metric: str) -> layout_pb2.Chart:
        pattern = rf"^{re.escape(f'{GLOBAL_SECTION}/{metric}')}$"
        return layout_pb2.Chart(title=f"global/{metric}", multiline=layout_pb2.MultilineChartContent(tag=[pattern]))

    lead = [per_module(m) for m in DIAGNOSTIC_METRICS if m in metrics]
    lead += [whole(m) for m in DIAGNOSTIC_GLOBALS if m in global_metrics]
    rest = [per_module(m) for m in sorted(metrics - set(DIAGNOSTIC_METRICS))]
    rest += [whole(m) for m in sorted(global_metrics - set(DIAGNOSTIC_GLOBALS))]
    categories = []
    if lead:
        categories.append(layout_pb2.Category(title=LAYOUT_CATEGORY, chart=lead))
    if rest:
        categories.append(layout_pb2.Category(title=LAYOUT_MORE, chart=rest, closed=bool(lead)))
    # the Custom Scalars plugin's own record (its `summary.pb` needs TensorFlow, hence built here)
    layout = layout_pb2.Layout(category=categories).SerializeToString()
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout], tensor_shape=TensorShapeProto())
    plugin = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME))
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=plugin)])


class WandbWriter(Writer):
    """Scalars through the logger; text as ``wandb.Html``; pictures as ``wandb.Image`` (offline mode too)."""

    shows_media = True

    def text(self, tag: str, text: str, step: int) -> None:
        import wandb

        page = f"<pre style='white-space: pre-wrap'>{html.escape(text)}</pre>"
        self.logger.experiment.log({tag: wandb.Html(page), "trainer/global_step": step})

    def images(self, images: Mapping[str, Any], step: int) -> None:
        import wandb

        if images:
            logged: dict[str, Any] = {tag: wandb.Image(image) for tag, image in images.items()}
            self.logger.experiment.log({**logged, "trainer/global_step": step})


class MLflowWriter(Writer):
    """Scalars through the logger; text as ``.md`` and pictures as ``.png`` artifacts of the run.

    Artifacts go to ``lightning_watch/<tag>/step_<step>.<ext>`` (the tag's ``/`` kept as folders).
    """

    shows_media = True

    def text(self, tag: str, text: str, step: int) -> None:
        self.logger.experiment.log_text(self.logger.run_id, text, _artifact(tag, step, "md"))

    def images(self, images: Mapping[str, Any], step: int) -> None:
        for tag, image in images.items():
            self.logger.experiment.log_image(self.logger.run_id, image, artifact_file=_artifact(tag, step, "png"))


def _artifact(tag: str, step: int, ext: str) -> str:
    # artifact paths are file paths: keep letters, digits and `._-/`, one folder per tag
    safe = re.sub(r"[^A-Za-z0-9._/-]+", "_", tag).strip("/")
    return f"lightning_watch/{safe}/step_{step:07d}.{ext}"


# One writer per logger object: the TensorBoard writer remembers the layout it wrote.
_writers: weakref.WeakKeyDictionary[Logger, Writer] = weakref.WeakKeyDictionary()
# The tag index of each model's modules (registration order), built once per model.
_orders: weakref.WeakKeyDictionary[Any, ModuleOrder] = weakref.WeakKeyDictionary()


def writer_for(logger: Logger) -> Writer:
    """The writer for ``logger`` (created once per logger): TensorBoard, W&B, MLflow, or scalars only."""
    writer = _writers.get(logger)
    if writer is None:
        if isinstance(logger, TensorBoardLogger):
            writer = TensorBoardWriter(logger)
        elif isinstance(logger, WandbLogger):
            writer = WandbWriter(logger)
        elif isinstance(logger, MLFlowLogger):
            writer = MLflowWriter(logger)
        else:
            writer = Writer(logger)
        _writers[logger] = writer
    return writer


def writers(trainer: pl.Trainer) -> list[Writer]:
    """Writers of the trainer's loggers, on rank zero; none elsewhere (every rank holds the same values)."""
    if not trainer.is_global_zero:
        return []
    return [writer_for(lg) for lg in trainer.loggers if not isinstance(lg, DummyLogger)]


def module_order(trainer: pl.Trainer) -> ModuleOrder:
    """The index of each module of the trained model in tags (``named_modules()`` order, kept per model)."""
    model = trainer.lightning_module
    if model is None:  # a Trainer not fitting a model (tests of the hub): names get indices as first seen
        return ModuleOrder([])
    order = _orders.get(model)
    if order is None:
        order = ModuleOrder(name for name, _ in model.named_modules() if name)
        _orders[model] = order
    return order


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


def logger_target(logger: object) -> str:
    """What a failed write names: the logger's class and its directory when it has one."""
    where = None
    with contextlib.suppress(Exception):  # some loggers compute their directory, and may fail too
        where = getattr(logger, "log_dir", None)
    return f"{type(logger).__name__} ({where})" if where else type(logger).__name__


def _each(trainer: pl.Trainer, what: str, call) -> None:
    for writer in writers(trainer):
        try:
            call(writer)
        except Exception as err:  # a logger that fails must not stop training: say it once, with where
            warn_write_failed(f"{logger_target(writer.logger)} ({what})", err)


def log_scalars(trainer: pl.Trainer, snapshot: Snapshot) -> None:
    """Send every scalar of ``snapshot`` to every attached logger, at Lightning's step."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    scalars = snapshot.scalars(module_order(trainer))
    if scalars:
        _each(trainer, "scalars", lambda w: w.scalars(scalars, snapshot.step))


def add_histograms(trainer: pl.Trainer, tensors: Mapping[str, Tensor], step: int) -> None:
    """Write ``tag -> tensor`` histograms (the tensor moves to the CPU here: histogram steps only)."""
    if tensors:
        _each(trainer, "histograms", lambda w: w.histograms(tensors, step))


def add_text(trainer: pl.Trainer, tag: str, text: str, step: int) -> None:
    """Write Markdown ``text`` under ``tag`` (TensorBoard's Text tab, W&B HTML, MLflow artifacts)."""
    _each(trainer, "text", lambda w: w.text(tag, text, step))


def add_images(trainer: pl.Trainer, images: Mapping[str, Any], step: int) -> None:
    """Write ``tag -> HWC uint8 array`` pictures to every logger that shows pictures."""
    if images:
        _each(trainer, "pictures", lambda w: w.images(images, step))


def flush(trainer: pl.Trainer) -> None:
    """Flush every writer (end of fit)."""
    _each(trainer, "flush", lambda w: w.flush())


def progress_bar_metrics(alerts: Sequence[Any]) -> dict[str, float]:
    """Lightning ``prog_bar`` metrics for the health line: the number of warnings and errors raised.

    ``0.0`` reads "watch: ok"; Lightning's progress bar shows only numbers, so the count is the line.
    Info alerts do not count. Call it with the engine's alert list and log the result with
    ``pl_module.log_dict(..., prog_bar=True, logger=False)`` (see the handoff for the wiring).

    Example:
        >>> from types import SimpleNamespace as A
        >>> progress_bar_metrics([A(severity="warning"), A(severity="info"), A(severity="error")])
        {'watch_warnings': 2.0}
        >>> progress_bar_metrics([])
        {'watch_warnings': 0.0}
    """
    count = sum(1 for alert in alerts if getattr(alert, "severity", "warning") != "info")
    return {PROGRESS_KEY: float(count)}
