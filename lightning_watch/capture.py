"""The capture engine: one forward hook per module, shared by every monitor that watches it.

Monitors never register hooks themselves. They *subscribe* to the engine of a model with the
modules they watch, and *arm* it for the training batches they sample. The engine registers a
hook on a module when the first armed subscriber needs it and removes it when the last one
disarms, so batches that nobody samples run with no hook at all. Each hook call measures its
output once (:class:`CapturedOutput` computes each statistic lazily and caches it) and hands the
result to every armed subscriber of that module.

Hooks never raise into the user's forward pass: a module whose output cannot be measured (no
tensor, an integer tensor, a failure inside a statistic) is skipped with one warning. Complex
outputs are measured as their magnitude ``|z|``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_watch.outputs import is_measurable, primary_tensor, unit_dim
from lightning_watch.selection import owns_parameters
from lightning_watch.stats import alive_units, moment_row
from lightning_watch.warn import warn_once

log = logging.getLogger(__name__)

#: Output ranges of squashing activations, for the saturation statistic.
BOUNDED_OUTPUTS: dict[type[nn.Module], tuple[float, float]] = {
    nn.Sigmoid: (0.0, 1.0),
    nn.Hardsigmoid: (0.0, 1.0),
    nn.Tanh: (-1.0, 1.0),
    nn.Hardtanh: (-1.0, 1.0),
    nn.Softsign: (-1.0, 1.0),
}


@dataclass(frozen=True)
class ModuleInfo:
    """What the engine knows about one watched module."""

    name: str
    module: nn.Module
    bounds: tuple[float, float] | None
    #: the last parameter-owning module registered before this one: an activation's input
    #: layout (channels first or last) is that module's output layout.
    producer: nn.Module | None
    #: whether the module owns parameters itself (a layer), found once: every sampled step arms hooks
    is_layer: bool = False


class CapturedOutput:
    """One call's output, measured lazily: each statistic is computed at most once per call."""

    __slots__ = ("_alive", "_margin", "_row", "info", "producer", "tensor")

    def __init__(self, info: ModuleInfo, tensor: Tensor, margin: float, producer: nn.Module | None = None) -> None:
        self.info = info
        self.tensor = tensor
        self._row: tuple[Tensor, int] | None = None
        self._alive: Tensor | None = None
        self._margin = margin
        #: the layer whose output this module received, when the engine saw it run; else the
        #: registration-order guess of :class:`ModuleInfo`
        self.producer = producer if producer is not None else info.producer

    def moment_row(self) -> tuple[Tensor, int]:
        """:func:`~lightning_watch.stats.moment_row` of the output: its statistics in one vector, and its size."""
        if self._row is None:
            self._row = moment_row(self.tensor, self.info.bounds, self._margin)
        return self._row

    def alive(self) -> Tensor:
        if self._alive is None:
            dim = unit_dim(self.info.module, self.tensor, self.producer)
            self._alive = alive_units(self.tensor, dim)
        return self._alive


class OutputSubscriber(Protocol):
    """What a monitor implements to receive captured outputs."""

    def consume(self, index: int, captured: CapturedOutput) -> None:
        """Called inside the forward hook; ``index`` is the module's position in the subscription."""


def is_compiled(model: nn.Module) -> bool:
    """True when ``model`` or one of its submodules runs through ``torch.compile``.

    Hooks added or removed after compilation are either ignored by the compiled graph or force a
    recompilation (pytorch/pytorch#117758), so the engine does not capture outputs of such models.
    """
    if getattr(model, "_compiler_ctx", None):  # Lightning unwrapped `torch.compile(model)` for us
        return True
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            return True
        if type(module).__name__ == "OptimizedModule":
            return True
    return False


class CaptureEngine:
    """Shared forward-hook manager of one model.

    Use :meth:`for_model` to get the engine of a model (created on first use); the engine forgets
    the model when its last subscriber leaves, and holds no reference that keeps it alive.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> class Collect:
        ...     def __init__(self): self.seen = []
        ...     def consume(self, index, captured): self.seen.append(captured.alive().shape)
        >>> sub = Collect()
        >>> engine = CaptureEngine.for_model(model)
        >>> _ = engine.subscribe(sub, [("1", model[1])])
        >>> engine.arm(sub); _ = model(torch.randn(2, 4)); engine.disarm(sub)
        >>> sub.seen
        [torch.Size([3])]
        >>> engine.unsubscribe(sub); engine.hook_count
        0
    """

    _engines: ClassVar[weakref.WeakKeyDictionary[nn.Module, CaptureEngine]] = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module, saturation_margin: float = 0.01) -> None:
        self._model_ref = weakref.ref(model)
        self.saturation_margin = saturation_margin
        self._subscriptions: dict[OutputSubscriber, list[ModuleInfo]] = {}
        self._skipped: dict[OutputSubscriber, set[int]] = {}
        # module -> armed (subscriber, index) pairs; a module is hooked iff it has an entry
        self._armed: dict[nn.Module, list[tuple[OutputSubscriber, int]]] = {}
        self._handles: dict[nn.Module, RemovableHandle] = {}
        self._disabled: set[nn.Module] = set()
        # the last hooked parametrized module that ran: the producer of the next activation's input
        self._last_layer: nn.Module | None = None
        #: total hook invocations, for tests that prove one pass per module call
        self.hook_calls = 0
        self.compiled = is_compiled(model)

    @classmethod
    def for_model(cls, model: nn.Module) -> CaptureEngine:
        engine = cls._engines.get(model)
        if engine is None:
            engine = cls._engines[model] = cls(model)
        return engine

    @property
    def hook_count(self) -> int:
        """Number of forward hooks currently registered by this engine."""
        return len(self._handles)

    def describe(self, named: Iterable[tuple[str, nn.Module]]) -> list[ModuleInfo]:
        """Build :class:`ModuleInfo` for ``(name, module)`` pairs of this engine's model."""
        model = self._model_ref()
        producers: dict[nn.Module, nn.Module | None] = {}
        last: nn.Module | None = None
        for _, module in model.named_modules() if model is not None else ():
            producers.setdefault(module, last)
            if owns_parameters(module):
                last = module
        # an activation registered before every parametrized layer (`self.act = nn.ReLU()` first
        # in `__init__`, then reused after each layer) takes the layout of the first such layer
        first = next((module for module in producers if owns_parameters(module)), None)
        return [
            ModuleInfo(
                name, module, _bounds_of(module), _first_not_none(producers.get(module), first), owns_parameters(module)
            )
            for name, module in named
        ]

    def subscribe(
        self, subscriber: OutputSubscriber, named: Iterable[tuple[str, nn.Module]], skip: Iterable[int] = ()
    ) -> list[ModuleInfo]:
        """Register ``subscriber`` for the outputs of ``named`` modules; returns their infos.

        ``skip``: positions in ``named`` whose outputs the subscriber does not need (they keep their
        index, and are never hooked for it).
        """
        infos = self.describe(named)
        self._subscriptions[subscriber] = infos
        self._skipped[subscriber] = set(skip)
        return infos

    def unsubscribe(self, subscriber: OutputSubscriber) -> None:
        """Forget ``subscriber``; when none remain, every hook is removed and the engine dropped."""
        self.disarm(subscriber)
        self._subscriptions.pop(subscriber, None)
        self._skipped.pop(subscriber, None)
        if not self._subscriptions:
            for handle in self._handles.values():
                handle.remove()
            self._handles.clear()
            self._armed.clear()
            model = self._model_ref()
            if model is not None and self._engines.get(model) is self:
                del self._engines[model]

    def arm(self, subscriber: OutputSubscriber) -> None:
        """Deliver outputs to ``subscriber`` until :meth:`disarm`; registers missing hooks."""
        if self.compiled:
            warn_once(
                ("compiled", id(self)),
                "lightning_watch: the model runs through torch.compile. Forward hooks added after "
                "compilation are ignored by the compiled graph or force a recompilation "
                "(pytorch/pytorch#117758), so module outputs are not captured: activation statistics "
                "and the output-based dead-unit counts of rectifier modules are off. Gradient norms, "
                "parameter deltas and gradient-based dead units of Linear/Conv layers still work.",
            )
            return
        self._last_layer = None
        skipped = self._skipped.get(subscriber, ())
        for index, info in enumerate(self._subscriptions.get(subscriber, ())):
            if info.module in self._disabled:
                continue
            armed = self._armed.setdefault(info.module, [])
            if index in skipped:
                if not info.is_layer:
                    continue
                # not measured for this subscriber, but still hooked: its hook returns at once after
                # noting the layer that ran, which tells the next activation its unit layout
            else:
                armed.append((subscriber, index))
            if info.module not in self._handles:
                self._handles[info.module] = info.module.register_forward_hook(self._make_hook(info))

    def disarm(self, subscriber: OutputSubscriber) -> None:
        """Stop delivering to ``subscriber``; removes hooks nobody else has armed."""
        for module in list(self._armed):
            remaining = [pair for pair in self._armed[module] if pair[0] is not subscriber]
            if remaining:
                self._armed[module] = remaining
            else:
                del self._armed[module]
                handle = self._handles.pop(module, None)
                if handle is not None:
                    handle.remove()

    def _make_hook(self, info: ModuleInfo):
        is_layer = info.is_layer

        def hook(module: nn.Module, args: object, output: object) -> None:
            self.hook_calls += 1
            producer = self._last_layer
            if is_layer:
                self._last_layer = module
            armed = self._armed.get(module)
            if not armed:
                return
            tensor = primary_tensor(output)
            if tensor is None or not is_measurable(tensor):
                kind = "no tensor" if tensor is None else f"a {tensor.dtype} tensor"
                warn_once(
                    ("unmeasurable", info.name, kind),
                    f"lightning_watch: module {info.name!r} ({type(module).__name__}) returned {kind}; "
                    "its output statistics are skipped.",
                )
                return
            if torch.is_complex(tensor):  # a spectral layer's output: its scale is the magnitude |z|
                tensor = tensor.detach().abs()
            captured = CapturedOutput(info, tensor, self.saturation_margin, None if is_layer else producer)
            try:
                for subscriber, index in armed:
                    subscriber.consume(index, captured)
            except Exception as err:  # never break the user's forward pass
                self._disabled.add(module)
                warn_once(
                    ("hook-error", info.name),
                    f"lightning_watch: measuring the output of {info.name!r} ({type(module).__name__}) failed "
                    f"({type(err).__name__}: {err}); this module's output statistics are off for the rest of the run.",
                )

        return hook


def _first_not_none(*modules: nn.Module | None) -> nn.Module | None:
    return next((module for module in modules if module is not None), None)


def _bounds_of(module: nn.Module) -> tuple[float, float] | None:
    if isinstance(module, nn.ReLU6):
        # a Hardtanh subclass, but a rectifier: its many exact zeros are units switched off
        # (DeadUnitMonitor's business), not saturation
        return None
    if isinstance(module, nn.Hardtanh):
        return (float(module.min_val), float(module.max_val))
    for cls, bounds in BOUNDED_OUTPUTS.items():
        if isinstance(module, cls):
            return bounds
    return None


def measurable_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
