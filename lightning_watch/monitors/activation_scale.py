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

_SUM, _SUM_SQ, _NONFINITE, _SATURATED = range(len(MOMENT_FIELDS))

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
        self._samples: dict[int, Tensor] = {}
        self._pending_state: dict[str, Any] | None = None

    def _default_module(self, module: nn.Module) -> bool:
        return owns_parameters(module) or isinstance(module, ACTIVATION_TYPES)

    def _on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._engine.saturation_margin = self.saturation_margin

    def _on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dtype = accumulator_dtype(self._device)
        n = len(self._modules)
        self._sums = torch.zeros(n, len(MOMENT_FIELDS), dtype=dtype, device=self._device)
        self._high = torch.full((n,), -math.inf, dtype=dtype, device=self._device)
        self._low = torch.full((n,), math.inf, dtype=dtype, device=self._device)
        self._counts = [0] * n  # elements seen: host numbers, no device work per call
        pending, self._pending_state = self._pending_state, None
        if pending is not None and len(pending.get("counts", ())) == n:
            self._sums.copy_(torch.tensor(pending["sums"], dtype=dtype))
            self._high.copy_(torch.tensor(pending["high"], dtype=dtype))
            self._low.copy_(torch.tensor(pending["low"], dtype=dtype))
            self._counts = list(pending["counts"])

    def _on_teardown(self) -> None:
        self._samples = {}

    def consume(self, index: int, captured: CapturedOutput) -> None:
        stats = captured.moments()
        self._sums[index, : stats.summed.shape[0]].add_(stats.summed)
        torch.maximum(self._high[index], stats.high, out=self._high[index])
        torch.minimum(self._low[index], stats.low, out=self._low[index])
        self._counts[index] += stats.count
        if self._histogram_due:
            flat = captured.tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // HISTOGRAM_SAMPLE)
            self._samples[index] = flat[::stride].float().clone()

    def _collect(self, trainer: pl.Trainer) -> StatBlock:
        block = StatBlock()
        if self._sums is None:
            return block
        block.add_sum(self._key("sums"), self._sums)
        block.add_max(self._key("high"), self._high)
        block.add_min(self._key("low"), self._low)
        # counts join the one read so that DDP sums them with everything else
        block.add_sum(self._key("counts"), torch.tensor(self._counts, dtype=self._sums.dtype, device=self._device))
        return block

    def _finalize(self, values: dict[str, Any], snapshot: Snapshot) -> None:
        if self._key("sums") not in values:
            return
        width = len(MOMENT_FIELDS)
        sums, highs, lows = values[self._key("sums")], values[self._key("high")], values[self._key("low")]
        for index, (info, count) in enumerate(zip(self._infos, values[self._key("counts")])):
            if not count:
                continue  # the module did not run on a sampled batch
            row = sums[index * width : (index + 1) * width]
            mean = row[_SUM] / count
            mean_sq = row[_SUM_SQ] / count
            variance = mean_sq - mean * mean
            snapshot.put("act_mean", mean, info.name)
            snapshot.put("act_rms", math.sqrt(mean_sq) if mean_sq >= 0 else math.nan, info.name)
            snapshot.put("act_std", math.sqrt(max(variance, 0.0)) if not math.isnan(variance) else math.nan, info.name)
            snapshot.put("act_max_abs", max(highs[index], -lows[index]), info.name)
            snapshot.put("act_nonfinite_frac", row[_NONFINITE] / count, info.name)
            if info.bounds is not None:
                snapshot.put("act_saturated_frac", row[_SATURATED] / count, info.name)

    def _reset(self) -> None:
        if self._sums is not None:
            self._sums.zero_()
            self._high.fill_(-math.inf)
            self._low.fill_(math.inf)
            self._counts = [0] * len(self._counts)

    def _histograms(self) -> dict[str, Tensor]:
        samples, self._samples = self._samples, {}
        return {f"watch_hist/activation/{self._infos[i].name}": t for i, t in samples.items()}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self._sums is None:
            return {}
        # checkpoint saving is not a hot path: one host copy of the open window
        return {
            "sums": self._sums.tolist(),
            "high": self._high.tolist(),
            "low": self._low.tolist(),
            "counts": list(self._counts),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict) if state_dict else None
