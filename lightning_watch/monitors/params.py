"""Parameters of the watched modules, grouped per module, with cached index tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_watch.monitors.base import WatchMonitor, strategy_shards_parameters
from lightning_watch.selection import direct_parameters, owns_parameters
from lightning_watch.stats import accumulator_dtype, constant


class ParameterTable:
    """Direct parameters of each watched module, and their per-module grouping.

    A parameter belongs to the module that registers it (``recurse=False``), so no parameter is
    counted twice when a container and its children are both watched. A parametrized weight is
    represented by its leaf (``parametrizations.weight.original``). A parameter held by several
    modules (an ``lm_head`` tied to the input embedding) is reported under *every* holder with its
    full norm, but counted once in whole-model figures.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> table = ParameterTable([("0", m[0]), ("2", m[2])])
        >>> [name for _, name, _ in table.entries]
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.module_names = [name for name, _ in modules]
        self._modules = list(modules)
        self._build()

    def _build(self) -> None:
        #: ``(module index, qualified name, parameter)``; a shared parameter has one entry per holder
        self.entries: list[tuple[int, str, nn.Parameter]] = [
            (index, f"{name}.{pname}", param)
            for index, (name, module) in enumerate(self._modules)
            for pname, param in direct_parameters(module)
        ]
        self._groups_of: dict[int, list[int]] = {}
        self._unique: list[tuple[int, str, nn.Parameter]] = []
        for entry in self.entries:
            groups = self._groups_of.setdefault(id(entry[2]), [])
            if not groups:
                self._unique.append(entry)
            groups.append(entry[0])
        self._index_cache: dict[tuple[int, ...], _Grouping] = {}
        self._identity = [id(p) for _, _, p in self.entries]

    def refresh(self) -> None:
        """Re-read the parameters if the modules now hold other objects.

        ``fully_shard`` (FSDP2) in ``configure_model`` replaces each parameter with a ``DTensor``
        one, and Lightning calls ``configure_model`` after the callbacks' ``setup``.
        """
        current = [id(p) for _, module in self._modules for _, p in direct_parameters(module)]
        if current != self._identity:
            self._build()

    @property
    def num_modules(self) -> int:
        return len(self.module_names)

    def trainable(self) -> list[tuple[int, str, nn.Parameter]]:
        """One entry per distinct parameter that currently requires a gradient (unfrozen ones too)."""
        return [entry for entry in self._unique if entry[2].requires_grad]

    def shared(self) -> dict[str, list[str]]:
        """Qualified name of each parameter held by several watched modules -> its holders."""
        out: dict[str, list[str]] = {}
        for _, name, param in self._unique:
            groups = self._groups_of[id(param)]
            if len(groups) > 1:
                out[name] = [self.module_names[g] for g in groups]
        return out

    def grouping(self, params: Sequence[Tensor], device: torch.device) -> _Grouping:
        """How ``params`` map onto the watched modules, made once per parameter list (then cached).

        A parameter outside the table maps to the extra slot ``num_modules``; one held by several
        modules gives one pair per holder. The index tensors are copied to the device once, not
        per step, and the per-module parameter counts, which do not change either, come with them.
        """
        key = tuple(id(p) for p in params)
        grouping = self._index_cache.get(key)
        if grouping is None:
            source: list[int] = []
            group: list[int] = []
            for position, pid in enumerate(key):
                for g in self._groups_of.get(pid, (self.num_modules,)):
                    source.append(position)
                    group.append(g)
            counts = [0.0] * (self.num_modules + 1)
            for g in group:
                counts[g] += 1.0
            grouping = self._index_cache[key] = _Grouping(
                # no parameter held twice: the rows need no gather before the scatter
                source=None if source == list(range(len(key))) else constant(tuple(source), torch.long, device),
                group=constant(tuple(group), torch.long, device),
                counts=constant(tuple(counts), accumulator_dtype(device), device),
            )
        return grouping

    def per_module(self, params: Sequence[Tensor], rows: Tensor, device: torch.device) -> Tensor:
        """Per-parameter values summed per watched module: ``rows`` is ``(k, len(params))``, the result
        ``(k, num_modules + 1)`` (last column: parameters outside the table).

        Several per-parameter quantities (squared norms, non-finite counts) share one scatter-add.
        """
        grouping = self.grouping(params, device)
        rows = rows.to(device)
        if grouping.source is not None:  # a tied weight: one column per holder
            rows = rows.index_select(1, grouping.source)
        out = torch.zeros(rows.shape[0], self.num_modules + 1, dtype=rows.dtype, device=device)
        return out.index_add_(1, grouping.group, rows)


class _Grouping(NamedTuple):
    source: Tensor | None  # column of each (parameter, holder) pair; None: one holder each, in order
    group: Tensor  # the module of each pair
    counts: Tensor  # parameters per module (last slot: outside the table); shared, never modified


class ParameterMonitor(WatchMonitor):
    """Base of the monitors that read parameters and their gradients (not module outputs).

    Default selection: every module that registers parameters itself.
    """

    _table: ParameterTable | None = None
    _sharded = False

    def _default_module(self, module: nn.Module) -> bool:
        return owns_parameters(module)

    def _on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._table = ParameterTable(self._modules)
        self._sharded = strategy_shards_parameters(trainer)

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._table is not None:  # parameters may have been swapped in `configure_model`
            self._table.refresh()
        super().start(trainer, pl_module)
