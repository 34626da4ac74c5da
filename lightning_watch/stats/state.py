"""Accumulator state declared once: allocation, reset, cross-process reduction, checkpointing.

In the spirit of torchmetrics' ``Metric.add_state(name, default, dist_reduce_fx, persistent)``:
a statistic source declares each device accumulator with how it starts and how it combines
across processes, and :class:`StateRegistry` gives it the rest — allocation on the model's
device, ``reset`` after each read, the :class:`~lightning_watch.stats.StatBlock` of the one read
per logging step, and ``state_dict``/``load_state_dict`` (a state loaded before the device is
known is applied when the accumulators are allocated).

Unlike torchmetrics, nothing here synchronizes by itself: every source's block joins the hub's
single packed read (one collective for all of them, where ``Metric.sync`` costs one per state).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_watch.stats.kernels import accumulator_dtype
from lightning_watch.stats.reduce import StatBlock

REDUCTIONS = ("sum", "max", "min")

#: what a fresh accumulator holds for each reduction: the identity of that reduction
_IDENTITY = {"sum": 0.0, "max": -math.inf, "min": math.inf}


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: Callable[[], tuple[int, ...]] | tuple[int, ...] | None  # None: sized by the first value set
    reduce: str
    dtype: torch.dtype | None  # None: the accumulator dtype of the device (float64, float32 on MPS)
    persistent: bool
    host: bool  # a Python list: counts known on the host cost no device work per update


class StateRegistry:
    """Named device accumulators with declared reductions.

    Example:
        >>> state = StateRegistry()
        >>> state.declare("sums", shape=(2,), reduce="sum")
        >>> state.declare("peak", shape=(), reduce="max")
        >>> state.allocate(torch.device("cpu"))
        >>> state["sums"] += torch.tensor([1.0, 2.0]); state["peak"] = torch.tensor(3.0)
        >>> sorted(state.block("m").sums), state.state_dict()["sums"]
        (['m.sums'], [1.0, 2.0])
        >>> state.reset(); state["peak"].item()
        -inf
    """

    def __init__(self) -> None:
        self._specs: dict[str, _Spec] = {}
        self._values: dict[str, Tensor | None] = {}
        self._device: torch.device | None = None
        self._pending: dict[str, Any] | None = None

    def declare(
        self,
        name: str,
        shape: Callable[[], tuple[int, ...]] | tuple[int, ...] | None,
        reduce: str = "sum",
        dtype: torch.dtype | None = None,
        persistent: bool = True,
        host: bool = False,
    ) -> None:
        """Declare accumulator ``name``.

        Args:
            name: unique within the registry.
            shape: a shape, a callable giving it at allocation (sizes known only at fit start),
                or ``None`` for an accumulator sized by the first tensor assigned to it.
            reduce: ``"sum"``, ``"max"`` or ``"min"`` across processes; also what ``reset`` fills in
                (0, -inf, +inf; ``False`` for boolean accumulators).
            dtype: fixed dtype (e.g. ``torch.bool``); default: float64 (float32 on MPS).
            persistent: whether ``state_dict`` includes it.
            host: keep it as a Python list of numbers (1-D shapes only): for counts the host
                already knows (elements seen), which then cost no kernel per update; it joins the
                read as a tensor.
        """
        if reduce not in REDUCTIONS:
            raise ValueError(f"`reduce` must be one of {', '.join(REDUCTIONS)}, got {reduce!r}.")
        if name in self._specs:
            raise ValueError(f"accumulator {name!r} is declared twice")
        self._specs[name] = _Spec(name, shape, reduce, dtype, persistent, host)
        self._values[name] = None

    def clear(self) -> None:
        """Forget every declaration (a new fit declares again); a state loaded and not yet applied stays."""
        self._specs.clear()
        self._values.clear()
        self._device = None

    @property
    def allocated(self) -> bool:
        return self._device is not None

    def allocate(self, device: torch.device) -> None:
        """Create every accumulator on ``device`` at its identity; apply a state loaded earlier."""
        self._device = device
        for spec in self._specs.values():
            shape = spec.shape() if callable(spec.shape) else spec.shape
            self._values[spec.name] = None if shape is None else self._fresh(spec, shape)
        pending, self._pending = self._pending, None
        if pending:
            self._apply(pending)

    def release(self) -> None:
        """Drop every accumulator (end of fit); declarations stay."""
        self._device = None
        self._values = dict.fromkeys(self._specs)

    def __getitem__(self, name: str) -> Tensor | list | None:
        return self._values[name]

    def __setitem__(self, name: str, value: Tensor) -> None:
        if name not in self._specs:
            raise KeyError(f"accumulator {name!r} is not declared")
        self._values[name] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def reset(self) -> None:
        """Refill every accumulator with its reduction's identity (sizes are kept, so every rank
        keeps the same layout for the next read)."""
        for name, value in self._values.items():
            spec = self._specs[name]
            if spec.host and value is not None:
                value[:] = [_IDENTITY[spec.reduce]] * len(value)
            elif value is not None:
                value.fill_(self._identity(spec, value.dtype))

    def block(self, prefix: str, names: Iterator[str] | None = None) -> StatBlock:
        """The accumulators (all, or ``names``) as one read's block, under ``prefix.name``."""
        block = StatBlock()
        adders = {"sum": block.add_sum, "max": block.add_max, "min": block.add_min}
        for name in names if names is not None else self._specs:
            value = self._values[name]
            if isinstance(value, list):
                value = list(value)  # a host list travels as it is (read_blocks moves it only to gather)
            if value is not None:
                adders[self._specs[name].reduce](f"{prefix}.{name}", value)  # read_blocks widens bools
        return block

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Persistent accumulators as host lists (checkpoint saving is not a hot path)."""
        return {
            name: None if value is None else list(value) if isinstance(value, list) else value.tolist()
            for name, value in self._values.items()
            if self._specs[name].persistent
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore accumulators now, or at :meth:`allocate` when the device is not known yet."""
        if not state:
            return
        if self._device is None:
            self._pending = dict(state)
        else:
            self._apply(state)

    def _apply(self, state: dict[str, Any]) -> None:
        for name, saved in state.items():
            spec = self._specs.get(name)
            if spec is None or saved is None:
                continue
            current = self._values[name]
            if spec.host:
                if current is None:
                    self._values[name] = list(saved)
                elif len(current) == len(saved):
                    current[:] = saved  # in place: a per-step fast path may hold this very list
                continue
            restored = torch.tensor(saved, dtype=self._dtype(spec), device=self._device)
            # a checkpoint of another model layout is ignored rather than half-applied
            if current is None or current.shape == restored.shape:
                self._values[name] = restored

    # ------------------------------------------------------------------ helpers
    def _dtype(self, spec: _Spec) -> torch.dtype:
        return spec.dtype if spec.dtype is not None else accumulator_dtype(self._device)

    def _fresh(self, spec: _Spec, shape: tuple[int, ...]) -> Tensor | list:
        if spec.host:
            return [_IDENTITY[spec.reduce]] * (shape[0] if shape else 1)
        dtype = self._dtype(spec)
        return torch.full(shape, self._identity(spec, dtype), dtype=dtype, device=self._device)

    @staticmethod
    def _identity(spec: _Spec, dtype: torch.dtype) -> float | bool:
        return False if dtype == torch.bool else _IDENTITY[spec.reduce]
