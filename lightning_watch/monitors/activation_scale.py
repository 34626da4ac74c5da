"""Scale of each watched module's outputs: mean, std, RMS, max-abs, non-finite and saturated shares."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_watch.capture import CapturedOutput
from lightning_watch.hub import StatHub
from lightning_watch.monitors.base import WatchMonitor
from lightning_watch.selection import ACTIVATION_TYPES, owns_parameters
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import MOMENT_FIELDS, ROW_FIELDS, StatBlock, StateRegistry, constant
from lightning_watch.warn import warn_once

_SUM, _SUM_SQ, _NONFINITE, _SATURATED = range(len(MOMENT_FIELDS))
_MAX, _MIN = ROW_FIELDS.index("max"), ROW_FIELDS.index("min")  # a moment_row's extremes, after its sums

#: cap on the elements kept per module for an activation histogram
HISTOGRAM_SAMPLE = 65_536


def _declare_window(state: StateRegistry, size: int) -> None:
    """The accumulators of one window: sums (modules, fields), running max/min, element counts."""
    state.declare("sums", (size, len(MOMENT_FIELDS)), reduce="sum")
    state.declare("high", (size,), reduce="max")
    state.declare("low", (size,), reduce="min")
    # elements seen: host numbers, no device work per call; summed over ranks in the read
    state.declare("counts", (size,), reduce="sum", host=True)


class _BatchRows:
    """The outputs measured in one batch, added to a window's accumulators when the batch ends.

    Added one by one, each output's statistics cost an indexed add, max and min (six views and three
    kernels per output: most of a logging step's operations on a model of many layers). Here each
    output's :func:`~lightning_watch.stats.moment_row` is kept, and the batch's rows are added with one
    ``stack``, one indexed add and one indexed max and min: a dozen operations per batch (a module
    called ``k`` times in a batch makes ``k`` rounds, each index at most once in a round).
    """

    def __init__(self) -> None:
        self._rows: list[tuple[int, Tensor]] = []

    def add(self, state: StateRegistry, index: int, captured: CapturedOutput) -> None:
        row, count = captured.moment_row()
        sums = state["sums"]
        if row.device != sums.device:  # raised inside the hook: that module alone is skipped, with a warning
            raise ValueError(f"its output is on {row.device}, the statistics of the window on {sums.device}")
        self._rows.append((index, row))
        state["counts"][index] += count  # host numbers: no device work

    def flush(self, state: StateRegistry) -> None:
        rows, self._rows = self._rows, []
        try:
            while rows:  # rounds: each module at most once in a round (its second call waits for the next)
                seen: set[int] = set()
                now: list[tuple[int, Tensor]] = []
                later: list[tuple[int, Tensor]] = []
                for entry in rows:
                    (later if entry[0] in seen else now).append(entry)
                    seen.add(entry[0])
                self._add_round(state, now)
                rows = later
        except Exception as err:  # never break the user's training: the window lacks this batch's outputs
            warn_once(
                ("activation-flush", type(err).__name__),
                f"lightning_watch: adding a batch's activation statistics failed ({type(err).__name__}: {err}); "
                "that batch is left out of its window.",
            )

    def clear(self) -> None:
        self._rows = []

    def _add_round(self, state: StateRegistry, rows: list[tuple[int, Tensor]]) -> None:
        sums, high, low = state["sums"], state["high"], state["low"]
        # the modules' order is the same on every batch: its index is made once (stats.constant)
        index = constant(tuple(index for index, _ in rows), torch.long, sums.device)
        block = torch.stack([row for _, row in rows])  # (outputs, ROW_FIELDS), promoted to the widest row
        if block.dtype != sums.dtype:
            block = block.to(sums.dtype)
        sums.index_add_(0, index, block[:, :_MAX])
        high.index_copy_(0, index, torch.maximum(high.index_select(0, index), block[:, _MAX]))
        low.index_copy_(0, index, torch.minimum(low.index_select(0, index), block[:, _MIN]))


class ActivationScaleMonitor(WatchMonitor):
    """Logs the scale of each watched module's output over the sampled training batches.

    Every element of every call of the module on a sampled batch counts (a module called
    several times per forward contributes every call). Statistics of a logging window are exact
    over its samples: sums and counts are accumulated, not means of means, and under DDP they are
    summed over ranks before the division. Tuple outputs (``nn.LSTM``, ``nn.MultiheadAttention``)
    are measured on their first element, ``PackedSequence`` on its data; integer outputs and
    ``None`` are skipped with one warning.

    Args:
        saturation_margin: for sigmoid/tanh-like modules (``nn.Sigmoid``, ``nn.Tanh``,
            ``nn.Hardtanh``, ``nn.Hardsigmoid``, ``nn.Softsign``), a value within
            ``margin * (hi - lo)`` of an asymptote counts as saturated. The default 0.01 counts a
            sigmoid output below 0.01 or above 0.99 (a pre-activation beyond ±4.6).
        validation: also measure every validation batch (sanity check excluded) and log the
            epoch's statistics as ``watch.val_<metric>/<NN>.<module>`` at the end of each validation.
        **kwargs: selection and cadence arguments of :class:`~lightning_watch.monitors.WatchMonitor`.
            Default selection: modules that register parameters, plus activation modules.

    Logged Metrics:
        - ``watch.act_mean/<NN>.<module>``, ``watch.act_std/<NN>.<module>``, ``watch.act_rms/<NN>.<module>``:
          over all output elements of the window (population std).
        - ``watch.act_max_abs/<NN>.<module>``: largest absolute output value in the window.
        - ``watch.act_nonfinite_frac/<NN>.<module>``: share of NaN/Inf output values.
        - ``watch.act_saturated_frac/<NN>.<module>``: share of saturated values (bounded activations only).
        - with ``validation=True``: the same under ``watch.val_act_*/<NN>.<module>``, one point per validation run.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ActivationScaleMonitor(types=["Sigmoid", "Linear"])], logger=False)
    """

    METRICS = ("act_mean", "act_std", "act_rms", "act_max_abs", "act_nonfinite_frac", "act_saturated_frac")
    CAPTURES_OUTPUTS = True
    # Scales change smoothly: one batch per logging window (its last) tells them; each sampled
    # batch costs a few reductions per watched output (dead units need several batches, not this).
    SAMPLES_PER_WINDOW = 1

    def __init__(self, saturation_margin: float = 0.01, validation: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(validation, bool):
            raise ValueError(f"`validation` must be True or False, got {validation!r}.")
        self.validation = validation
        if validation:
            self.METRICS = (*self.METRICS, *(f"val_{metric}" for metric in self.METRICS))
        if (
            isinstance(saturation_margin, bool)
            or not isinstance(saturation_margin, (int, float))
            or not 0 < saturation_margin < 0.5
        ):
            raise ValueError(f"`saturation_margin` must be a number in (0, 0.5), got {saturation_margin!r}.")
        self.saturation_margin = float(saturation_margin)
        self._val_window: StateRegistry | None = None
        self._samples: dict[int, Tensor] = {}
        self._rows = _BatchRows()  # outputs of the batch being measured (training or validation)

    def _default_module(self, module: nn.Module) -> bool:
        return owns_parameters(module) or isinstance(module, ACTIVATION_TYPES)

    def _on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._engine.saturation_margin = self.saturation_margin

    def _declare_state(self, state: StateRegistry) -> None:
        _declare_window(state, len(self._modules))

    def _on_teardown(self) -> None:
        self._samples = {}
        self._val_window = None
        self._rows.clear()  # a batch cut short by an exception is not added anywhere

    def _on_batch_end(self) -> None:
        self._rows.flush(self.state)

    def consume(self, index: int, captured: CapturedOutput) -> None:
        self._rows.add(self._val_window or self.state, index, captured)
        if self._histogram_due and self._val_window is None:
            flat = captured.tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // HISTOGRAM_SAMPLE)
            self._samples[index] = flat[::stride].float().clone()

    def _collect(self) -> StatBlock:
        self._rows.flush(self.state)  # outputs measured since the last batch end (none, in a fit's normal course)
        return self.state.block(self._key("train"))

    def _finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        self.put_window(values, self._key("train"), snapshot, prefix="")

    @property
    def val_key(self) -> str:
        """Prefix of the validation window's statistics in a read."""
        return self._key("val")

    def put_window(self, values: Mapping[str, Any], key: str, snapshot: Snapshot, prefix: str) -> None:
        """Snapshot entries (``<prefix>act_*``) from the read values of the window under ``key``."""
        if f"{key}.sums" not in values:
            return
        width = len(MOMENT_FIELDS)
        sums, highs, lows = values[f"{key}.sums"], values[f"{key}.high"], values[f"{key}.low"]
        for index, (info, count) in enumerate(zip(self._infos, values[f"{key}.counts"])):
            if not count:
                continue  # the module did not run on a measured batch
            row = sums[index * width : (index + 1) * width]
            mean = row[_SUM] / count
            mean_sq = row[_SUM_SQ] / count
            variance = mean_sq - mean * mean
            snapshot.put(f"{prefix}act_mean", mean, info.name)
            snapshot.put(f"{prefix}act_rms", math.sqrt(mean_sq) if mean_sq >= 0 else math.nan, info.name)
            std = math.sqrt(max(variance, 0.0)) if not math.isnan(variance) else math.nan
            snapshot.put(f"{prefix}act_std", std, info.name)
            snapshot.put(f"{prefix}act_max_abs", max(highs[index], -lows[index]), info.name)
            snapshot.put(f"{prefix}act_nonfinite_frac", row[_NONFINITE] / count, info.name)
            if info.bounds is not None:
                snapshot.put(f"{prefix}act_saturated_frac", row[_SATURATED] / count, info.name)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validation and self._engine is not None and not trainer.sanity_checking:
            self._val_window = StateRegistry()
            _declare_window(self._val_window, len(self._modules))
            self._val_window.allocate(self._device)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._val_window is not None:
            self._engine.arm(self)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._val_window is not None:
            self._engine.disarm(self)
            self._rows.flush(self._val_window)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        window, self._val_window = self._val_window, None
        if window is None:
            return
        source = _ValidationWindow(self, window)
        # written, but not handed to the alert rules: they judge training windows
        self.last_validation_snapshot = StatHub.for_trainer(trainer).publish(trainer, pl_module, [source], notify=False)

    def _histograms(self) -> dict[str, Tensor]:
        samples, self._samples = self._samples, {}
        return {f"watch_hist/activation/{self._infos[i].name}": t for i, t in samples.items()}


class _ValidationWindow:
    """The validation window of one :class:`ActivationScaleMonitor` as a one-off hub source."""

    cadence = None

    def __init__(self, monitor: ActivationScaleMonitor, window: StateRegistry) -> None:
        self._monitor, self._window = monitor, window

    def collect(self) -> StatBlock:
        return self._window.block(self._monitor.val_key)

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        self._monitor.put_window(values, self._monitor.val_key, snapshot, prefix="val_")

    def reset(self) -> None:
        pass

    def histograms(self) -> dict[str, Tensor]:
        return {}
