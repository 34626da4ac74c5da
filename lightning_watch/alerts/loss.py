"""The training loss as the alert rules see it: window accumulators, one read per logging step.

``outputs["loss"]`` of every training batch is *kept* (a reference: no kernel, no read), and the
kept losses are folded into the window (finite sum and count, non-finite count, min, max) on
sampled and logging steps with one stack and a few reductions; the window is read with the other
statistics in the hub's single read of the logging step. Each fold also tells whether a loss was
non-finite, without any host sync: on the CPU the folded values are read directly (no device to
wait for), on CUDA a flag is copied asynchronously into pinned host memory and read once its event
has completed, a fold or two later. A NaN loss is therefore told within about one sampling
interval (at most 10 steps by default), not on the step itself.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_watch.cadence import Cadence
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock, StateRegistry, accumulator_dtype

#: number of first training losses averaged into the "initial loss" the plateau/divergence rules compare with
INITIAL_STEPS = 10
#: most losses kept between two folds (a long stretch without a sampled step folds on the way)
RING = 64


def extract_loss(outputs: Any) -> Tensor | None:
    """The scalar training loss in a batch's ``outputs`` (a tensor, or a mapping with ``"loss"``), or ``None``.

    It may still be attached to the graph (manual optimization): :meth:`LossWindow.add` reads it
    without keeping it. Under gradient accumulation Lightning hands it divided by
    ``accumulate_grad_batches``; :meth:`LossWindow.add` takes the factor that undoes this.
    """
    # `type(...) is dict` first: Lightning's outputs are a dict, and an ABC check costs more (every batch)
    loss = outputs.get("loss") if type(outputs) is dict or isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        return None  # manual optimization may return anything, or nothing
    return loss


class LossWindow:
    """Window statistics of the training loss: a :class:`~lightning_watch.hub.StatSource` of the alert engine.

    Example:
        >>> from lightning_watch.cadence import Cadence
        >>> window = LossWindow()
        >>> window.start(Cadence(log=2, sample=1), torch.device("cpu"))
        >>> window.add(torch.tensor(2.0)); window.add(torch.tensor(4.0))
        >>> from lightning_watch.stats import read_blocks
        >>> snap = Snapshot(step=1, epoch=0); window.finalize(read_blocks([window.collect()]), snap)
        >>> snap.get("loss"), snap.get("loss_max")
        (3.0, 4.0)

    Logged Metrics:
        - ``watch.global/loss``: mean of the finite training losses of the window.
        - ``watch.global/loss_std``: their standard deviation (step-to-step noise).
        - ``watch.global/loss_min``, ``watch.global/loss_max``: their extremes.
        - ``watch.global/loss_nonfinite``: number of NaN/Inf losses in the window.
    """

    GLOBAL_METRICS = ("loss", "loss_std", "loss_min", "loss_max", "loss_nonfinite")

    def __init__(self) -> None:
        self.cadence: Cadence | None = None
        self.KEY = f"LossWindow@{id(self):x}"  # unique across the sources of one read
        self.initial_loss = math.nan
        self._initial_seen = 0
        self._provisional = math.nan
        self._on_host = True
        self._pending: list[Tensor] = []  # losses of the batches since the last fold
        self._scale = 1.0
        self._dtype = torch.float64
        self._guard = NonFiniteGuard()
        self._pending_initial: list[float] | None = None
        self.state = StateRegistry()

    def clear(self) -> None:
        """A new fit: forget the previous fit's losses (a checkpoint loaded afterwards restores them)."""
        self.initial_loss = math.nan
        self._initial_seen = 0
        self._provisional = math.nan
        self._pending_initial = None

    def start(self, cadence: Cadence, device: torch.device, scale: float = 1.0) -> None:
        """Allocate for losses on ``device`` (fit start); a window restored from a checkpoint is applied here.

        ``scale`` multiplies every loss (Lightning hands an accumulating batch's loss divided by
        ``accumulate_grad_batches``). Each batch's loss tensor is only *kept* (:meth:`add`: no
        kernel, no read); :meth:`fold` turns the kept losses into the window's accumulators on
        sampled and logging steps, with one stack and a few reductions. On the CPU the folded
        values are read as Python floats (reading a CPU tensor waits for no device) and summed on
        the host; on an accelerator they are summed on the device.
        """
        self.cadence = cadence
        self._on_host = device.type == "cpu"
        self._scale = float(scale)
        self._pending: list[Tensor] = []
        state = self.state
        state.clear()
        # finite sum, finite count, non-finite count, finite sum of squares; then min and max of the finite losses
        state.declare("sums", (4,), reduce="sum", host=self._on_host)
        state.declare("low", (1,), reduce="min", host=self._on_host)
        state.declare("high", (1,), reduce="max", host=self._on_host)
        state.allocate(device)
        self._dtype = accumulator_dtype(device)
        pending, self._pending_initial = self._pending_initial or [], None
        if self._on_host:
            self._initial: list[float] | Tensor = list(pending)
            return
        self._initial = torch.zeros(INITIAL_STEPS, dtype=self._dtype, device=device)
        if pending:
            self._initial[: len(pending)].copy_(torch.tensor(pending, dtype=self._dtype))

    def stop(self) -> None:
        self.cadence = None
        self._pending = []
        self._guard.clear()

    def add(self, loss: Tensor) -> None:
        """Keep one batch's loss for the next :meth:`fold`: no kernel, no read (this runs on every batch)."""
        self.keep(loss.detach() if loss.requires_grad else loss)  # a manual loss: its value, not its graph

    def keep(self, loss: Tensor) -> None:
        """:meth:`add` for a loss known to be a detached scalar (Lightning's, under automatic optimization)."""
        pending = self._pending
        pending.append(loss)
        if len(pending) >= RING:  # a long stretch without a sampled step: fold on the way
            self.fold()

    def fold(self) -> bool:
        """Add the kept losses to the window; returns whether a non-finite loss was seen.

        On the CPU the answer covers exactly the losses folded now. On CUDA it is the
        :class:`NonFiniteGuard`'s: an earlier fold's flag, copied asynchronously to the host, so a
        non-finite loss is told one or two folds later, never with a sync. Other accelerators
        answer ``False`` (the logging step's ``non_finite_loss`` rule still sees it).
        """
        pending = self._pending
        if not self.state.allocated:
            pending.clear()  # not started (a loss outside fit): nothing to add it to
            return False
        if not pending:
            return False
        try:
            losses = torch.stack(pending).reshape(-1)
        except RuntimeError:  # mixed shapes, () and (1,), or dtypes
            losses = torch.cat([loss.reshape(1).to(self._dtype) for loss in pending])
        pending.clear()
        if self._on_host:
            return self._fold_on_host(losses.tolist())
        losses = losses.to(self._dtype)
        if self._scale != 1.0:
            losses = losses * self._scale
        finite = torch.isfinite(losses)
        count = finite.sum(dtype=losses.dtype)
        kept = torch.where(finite, losses, 0.0)
        self.state["sums"].add_(torch.stack([kept.sum(), count, losses.numel() - count, kept.square().sum()]))
        low, high = self.state["low"], self.state["high"]
        torch.minimum(low, torch.where(finite, losses, math.inf).amin(), out=low)
        torch.maximum(high, torch.where(finite, losses, -math.inf).amax(), out=high)
        if self._initial_seen < INITIAL_STEPS:
            take = min(INITIAL_STEPS - self._initial_seen, losses.numel())
            self._initial[self._initial_seen : self._initial_seen + take].copy_(losses[:take])
            self._initial_seen += take
        return self._guard.push(finite)

    def _fold_on_host(self, values: list[float]) -> bool:
        sums, low, high = self.state["sums"], self.state["low"], self.state["high"]
        scale, nonfinite = self._scale, False
        for value in values:
            value *= scale
            if math.isfinite(value):
                sums[0] += value
                sums[1] += 1
                sums[3] += value * value
                low[0] = min(low[0], value)
                high[0] = max(high[0], value)
            else:
                sums[2] += 1
                nonfinite = True
            if self._initial_seen < INITIAL_STEPS:
                self._initial.append(value)
                self._initial_seen += 1
        return nonfinite

    def _initial_sums(self) -> Tensor:
        if self._on_host:
            finite = [v for v in self._initial[: self._initial_seen] if math.isfinite(v)]
            return torch.tensor([math.fsum(finite), len(finite)], dtype=torch.float64)
        first = self._initial[: self._initial_seen]
        finite = torch.isfinite(first)
        return torch.stack([torch.where(finite, first, 0.0).sum(), finite.sum(dtype=first.dtype)])

    # ------------------------------------------------------------------ StatSource
    def collect(self) -> StatBlock:
        if not self.state.allocated:
            return StatBlock()
        self.fold()
        block = self.state.block(self.KEY)
        block.add_sum(f"{self.KEY}.initial", self._initial_sums())
        return block

    def finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        if f"{self.KEY}.sums" not in values:
            return
        total, count, nonfinite, squares = values[f"{self.KEY}.sums"]
        initial_sum, initial_count = values[f"{self.KEY}.initial"]
        if count + nonfinite == 0:
            return  # no loss was seen (manual optimization returning nothing)
        snapshot.put("loss_nonfinite", nonfinite)
        if count:
            mean = total / count
            snapshot.put("loss", mean)
            snapshot.put("loss_std", math.sqrt(max(squares / count - mean * mean, 0.0)))
            snapshot.put("loss_min", values[f"{self.KEY}.low"][0])
            snapshot.put("loss_max", values[f"{self.KEY}.high"][0])
        if initial_count and not math.isfinite(self.initial_loss):
            if self._initial_seen >= INITIAL_STEPS:
                self.initial_loss = initial_sum / initial_count
            else:  # fewer first losses than wanted so far: a provisional value
                self._provisional = initial_sum / initial_count

    def reset(self) -> None:
        # the first losses stay: they stop growing after INITIAL_STEPS losses
        self.state.reset()

    def histograms(self) -> dict[str, Tensor]:
        return {}

    def current_initial_loss(self) -> float:
        """The initial loss (provisional while fewer than :data:`INITIAL_STEPS` losses were seen)."""
        return self.initial_loss if math.isfinite(self.initial_loss) else self._provisional

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"initial_loss": self.initial_loss, "initial_seen": self._initial_seen}
        if self.state.allocated:
            # checkpoint saving is not a hot path: one host copy of the open window
            self.fold()
            initial = self._initial[: self._initial_seen]
            state["window"] = {
                **self.state.state_dict(),
                "initial": list(initial) if self._on_host else initial.tolist(),
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_loss = float(state_dict.get("initial_loss", math.nan))
        self._initial_seen = int(state_dict.get("initial_seen", 0))
        window = dict(state_dict.get("window") or {})
        self._pending_initial = window.pop("initial", None)
        self.state.load_state_dict(window)
        if not window and not math.isfinite(self.initial_loss):
            self._initial_seen = 0  # measure the first losses of the resumed run instead


class NonFiniteGuard:
    """Notices a non-finite loss a few steps after it happens, without a host sync.

    Example:
        >>> guard = NonFiniteGuard()
        >>> losses = torch.tensor([1.0, float("nan")])
        >>> guard.push(torch.isfinite(losses[:1])), guard.push(torch.isfinite(losses))
        (False, True)
    """

    def __init__(self, depth: int = 4) -> None:
        self._depth = depth
        # CUDA: `depth` pinned host flags and events, allocated once and reused round-robin, so a
        # step costs one kernel, one copy and one event record (no allocation, no event creation)
        self._slots: list[tuple[Tensor, Any]] = []
        self._pending: deque[int] = deque()  # slots whose copy is in flight, oldest first
        self._free: list[int] = []

    def push(self, finite: Tensor) -> bool:
        """Record ``finite`` (flags of losses, any shape); return whether a non-finite loss has been seen
        since the last ``True``."""
        finite = finite.all()
        if finite.device.type == "cpu":
            return not bool(finite)  # a CPU tensor: reading it waits for no device
        if finite.device.type != "cuda":
            return False  # no cheap asynchronous read: the logging-step rule catches it
        if not self._slots:
            self._slots = [
                (torch.empty((), dtype=torch.bool, pin_memory=True), torch.cuda.Event()) for _ in range(self._depth)
            ]
            self._free = list(range(self._depth))
        seen = False
        while self._pending and self._slots[self._pending[0]][1].query():
            slot = self._pending.popleft()
            seen |= not bool(self._slots[slot][0])  # a completed copy in host memory: no wait
            self._free.append(slot)
        if self._free:
            slot = self._free.pop()
            host, event = self._slots[slot]
            host.copy_(finite, non_blocking=True)
            event.record()
            self._pending.append(slot)
        return seen

    def clear(self) -> None:
        self._free.extend(self._pending)
        self._pending.clear()
