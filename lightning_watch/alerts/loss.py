"""The training loss as the alert rules see it: device accumulators, one read per logging step.

``outputs["loss"]`` of every training batch is added on the device (finite sum and count,
non-finite count, min, max) and read with the other statistics in the foundation's single
read of the logging step. A cheap guard additionally notices a non-finite loss within a few
steps without any host sync: on the CPU the flag is read directly (no device to wait for), on
an accelerator it is copied asynchronously into pinned host memory and read once its CUDA event
has completed, a step or two later.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_watch.monitors._base import WatchMonitor
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock

#: number of first training losses averaged into the "initial loss" the plateau/divergence rules compare with
INITIAL_STEPS = 10


def extract_loss(outputs: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
    """The scalar training loss of one batch, undoing Lightning's accumulation scaling, or ``None``."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        return None  # manual optimization may return anything, or nothing
    loss = loss.detach().reshape(())
    if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
        # Lightning hands the loss already divided by `accumulate_grad_batches`
        loss = loss * trainer.accumulate_grad_batches
    return loss


class LossMonitor(WatchMonitor):
    """Window statistics of the training loss, published with the other monitors (internal).

    Logged Metrics:
        - ``watch/global/loss``: mean of the finite training losses of the window.
        - ``watch/global/loss_min``, ``watch/global/loss_max``: their extremes.
        - ``watch/global/loss_nonfinite``: number of NaN/Inf losses in the window.
    """

    GLOBAL_METRICS = ("loss", "loss_min", "loss_max", "loss_nonfinite")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.initial_loss = math.nan
        self._initial_seen = 0
        self._provisional = math.nan

    def _default_module(self, module: nn.Module) -> bool:
        return False  # the loss belongs to no module

    def _on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._allocate()

    def _allocate(self) -> None:
        # rows: finite sum, finite count, non-finite count, initial sum, initial count; then min, max
        self._sums = torch.zeros(
            5, dtype=torch.float64 if self._device.type != "mps" else torch.float32, device=self._device
        )
        self._low = torch.full((), math.inf, dtype=self._sums.dtype, device=self._device)
        self._high = torch.full((), -math.inf, dtype=self._sums.dtype, device=self._device)

    def add(self, loss: Tensor) -> None:
        """Accumulate one batch's loss on its device (no host sync)."""
        if not hasattr(self, "_sums"):
            self._allocate()
        loss = loss.to(self._sums)
        finite = torch.isfinite(loss)
        value = torch.where(finite, loss, torch.zeros_like(loss))
        initial = self._initial_seen < INITIAL_STEPS
        self._initial_seen += initial
        one = finite.to(loss.dtype)
        self._sums += torch.stack([value, one, 1 - one, value * initial, one * initial])
        torch.minimum(self._low, torch.where(finite, loss, math.inf), out=self._low)
        torch.maximum(self._high, torch.where(finite, loss, -math.inf), out=self._high)

    def _collect(self, trainer: pl.Trainer) -> StatBlock:
        block = StatBlock()
        if not hasattr(self, "_sums"):
            self._allocate()
        block.add_sum(self._key("sums"), self._sums)
        block.add_min(self._key("low"), self._low)
        block.add_max(self._key("high"), self._high)
        return block

    def _finalize(self, values: dict[str, Any], snapshot: Snapshot) -> None:
        total, count, nonfinite, initial_sum, initial_count = values[self._key("sums")]
        if count + nonfinite == 0:
            return  # no loss was seen (manual optimization returning nothing)
        snapshot.put("loss_nonfinite", nonfinite)
        if count:
            snapshot.put("loss", total / count)
            snapshot.put("loss_min", values[self._key("low")])
            snapshot.put("loss_max", values[self._key("high")])
        if initial_count and not math.isfinite(self.initial_loss):
            if self._initial_seen >= INITIAL_STEPS:
                self.initial_loss = initial_sum / initial_count
            else:  # fewer first losses than wanted so far: a provisional value
                self._provisional = initial_sum / initial_count

    def current_initial_loss(self) -> float:
        """The initial loss (provisional while fewer than :data:`INITIAL_STEPS` losses were seen)."""
        return self.initial_loss if math.isfinite(self.initial_loss) else self._provisional

    def _reset(self) -> None:
        # the initial sums stay: they stop growing after INITIAL_STEPS losses
        self._sums[:3] = 0
        self._low.fill_(math.inf)
        self._high.fill_(-math.inf)

    def state_dict(self) -> dict[str, Any]:
        return {"initial_loss": self.initial_loss, "initial_seen": self._initial_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_loss = float(state_dict.get("initial_loss", math.nan))
        self._initial_seen = int(state_dict.get("initial_seen", 0))
        if not math.isfinite(self.initial_loss):
            self._initial_seen = 0  # measure the first losses of the resumed run instead


class NonFiniteGuard:
    """Notices a non-finite loss a few steps after it happens, without a host sync.

    Example:
        >>> guard = NonFiniteGuard()
        >>> guard.push(torch.tensor(1.0)), guard.push(torch.tensor(float("nan")))
        (False, True)
    """

    def __init__(self, depth: int = 4) -> None:
        self._pending: deque[tuple[Tensor, Any]] = deque()
        self._depth = depth

    def push(self, loss: Tensor) -> bool:
        """Record ``loss``; return whether a non-finite loss has been seen since the last ``True``."""
        flag = ~torch.isfinite(loss)
        if loss.device.type == "cpu":
            return bool(flag)  # a CPU tensor: reading it waits for no device
        if loss.device.type != "cuda":
            return False  # no cheap asynchronous read: the logging-step rule catches it
        seen = False
        while self._pending and self._pending[0][1].query():
            host, _ = self._pending.popleft()
            seen |= bool(host)
        if len(self._pending) < self._depth:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event))
        return seen

    def clear(self) -> None:
        self._pending.clear()
