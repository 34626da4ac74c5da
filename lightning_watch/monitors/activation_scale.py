"""Scale of each watched module's outputs: mean, std, RMS, max-abs, non-finite and saturated shares."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_watch.capture import CapturedOutput
from lightning_watch.monitors._base import WatchMonitor
from lightning_watch.selection import ACTIVATION_TYPES, owns_parameters
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import MOMENT_FIELDS, StatBlock, accumulator_dtype

_SUM, _SUM_SQ, _MAX_ABS, _NONFINITE, _SATURATED, _COUNT = range(len(MOMENT_FIELDS))

#: cap on the elements kept per module for an activation histogram
HISTOGRAM_SAMPLE = 65_536


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
        **kwargs: selection and cadence arguments of :class:`~lightning_watch.monitors.WatchMonitor`.
            Default selection: modules that register parameters, plus activation modules.

    Logged Metrics:
        - ``watch/act_mean/<module>``, ``watch/act_std/<module>``, ``watch/act_rms/<module>``:
          over all output elements of the window (population std).
        - ``watch/act_max_abs/<module>``: largest absolute output value in the window.
        - ``watch/act_nonfinite_frac/<module>``: share of NaN/Inf output values.
        - ``watch/act_saturated_frac/<module>``: share of saturated values (bounded activations only).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ActivationScaleMonitor(types=["Sigmoid", "Linear"])], logger=False)
    """

    METRICS = ("act_mean", "act_std", "act_rms", "act_max_abs", "act_nonfinite_frac", "act_saturated_frac")
    CAPTURES_OUTPUTS = True

    def __init__(self, saturation_margin: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if (
            isinstance(saturation_margin, bool)
            or not isinstance(saturation_margin, (int, float))
            or not 0 < saturation_margin < 0.5
        ):
            raise ValueError(f"`saturation_margin` must be a number in (0, 0.5), got {saturation_margin!r}.")
        self.saturation_margin = float(saturation_margin)
        self._sums: Tensor | None = None
        self._max_abs: Tensor | None = None
        self._samples: dict[int, Tensor] = {}
        self._pending_state: dict[str, Any] | None = None

    def _default_module(self, module: nn.Module) -> bool:
        return owns_parameters(module) or isinstance(module, ACTIVATION_TYPES)

    def _on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._engine.saturation_margin = self.saturation_margin

    def _on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dtype = accumulator_dtype(self._device)
        self._sums = torch.zeros(len(self._modules), len(MOMENT_FIELDS), dtype=dtype, device=self._device)
        self._max_abs = torch.zeros(len(self._modules), dtype=dtype, device=self._device)
        if self._pending_state is not None and len(self._pending_state["sums"]) == len(self._modules):
            self._sums.copy_(torch.tensor(self._pending_state["sums"], dtype=dtype))
            self._max_abs.copy_(torch.tensor(self._pending_state["max_abs"], dtype=dtype))
        self._pending_state = None

    def _on_teardown(self) -> None:
        self._samples = {}

    def consume(self, index: int, captured: CapturedOutput) -> None:
        row = captured.moments()
        self._sums[index].add_(row)
        torch.maximum(self._max_abs[index], row[_MAX_ABS], out=self._max_abs[index])
        if self._histogram_due:
            flat = captured.tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // HISTOGRAM_SAMPLE)
            self._samples[index] = flat[::stride].float().clone()

    def _collect(self, trainer: pl.Trainer) -> StatBlock:
        block = StatBlock()
        if self._sums is None:
            return block
        block.add_sum(self._key("sums"), self._sums)
        block.add_max(self._key("max_abs"), self._max_abs)
        return block

    def _finalize(self, values: dict[str, Any], snapshot: Snapshot) -> None:
        if self._key("sums") not in values:
            return
        width = len(MOMENT_FIELDS)
        sums = values[self._key("sums")]
        for index, (info, max_abs) in enumerate(zip(self._infos, values[self._key("max_abs")])):
            row = sums[index * width : (index + 1) * width]
            count = row[_COUNT]
            if not count:
                continue  # the module did not run on a sampled batch
            mean = row[_SUM] / count
            mean_sq = row[_SUM_SQ] / count
            snapshot.put("act_mean", mean, info.name)
            snapshot.put("act_rms", math.sqrt(mean_sq) if mean_sq >= 0 else math.nan, info.name)
            variance = mean_sq - mean * mean
            snapshot.put("act_std", math.sqrt(max(variance, 0.0)) if not math.isnan(variance) else math.nan, info.name)
            snapshot.put("act_max_abs", max_abs, info.name)
            snapshot.put("act_nonfinite_frac", row[_NONFINITE] / count, info.name)
            if info.bounds is not None:
                snapshot.put("act_saturated_frac", row[_SATURATED] / count, info.name)

    def _reset(self) -> None:
        if self._sums is not None:
            self._sums.zero_()
            self._max_abs.zero_()

    def _histograms(self) -> dict[str, Tensor]:
        samples, self._samples = self._samples, {}
        return {f"watch_hist/activation/{self._infos[i].name}": t for i, t in samples.items()}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self._sums is None:
            return {}
        # checkpoint saving is not a hot path: one host copy of the open window
        return {"sums": self._sums.tolist(), "max_abs": self._max_abs.tolist()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict) if state_dict else None
