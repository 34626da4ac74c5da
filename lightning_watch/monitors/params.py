"""Parameters of the watched modules, grouped per module, with cached index tensors."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_watch.monitors.base import WatchMonitor, strategy_shards_parameters
from lightning_watch.selection import direct_parameters, owns_parameters
from lightning_watch.stats import group_norms


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
        self._index_cache: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
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

    def group_index(self, params: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
        """``(source, group)`` index pairs: ``params[source[k]]`` belongs to module ``group[k]``.

        A parameter outside the table maps to the extra slot ``num_modules``; one held by several
        modules gives one pair per holder. Cached per parameter list, so the index tensors are
        copied to the device once, not per step.
        """
        key = tuple(id(p) for p in params)
        pair = self._index_cache.get(key)
        if pair is None:
            source: list[int] = []
            group: list[int] = []
            for position, pid in enumerate(key):
                for g in self._groups_of.get(pid, (self.num_modules,)):
                    source.append(position)
                    group.append(g)
            pair = self._index_cache[key] = (
                torch.tensor(source, dtype=torch.long, device=device),
                torch.tensor(group, dtype=torch.long, device=device),
            )
        return pair

    def per_module_squares(self, params: Sequence[Tensor], norms: list[Tensor], device: torch.device) -> Tensor:
        """Squared L2 norm per watched module from per-parameter norms (last slot: unwatched)."""
        source, group = self.group_index(params, device)
        return group_norms(norms, group, self.num_modules + 1, source_index=source).square_()

    def per_module_sums(self, params: Sequence[Tensor], values: Tensor, device: torch.device) -> Tensor:
        """``values`` (one per parameter) summed per watched module (last slot: unwatched)."""
        source, group = self.group_index(params, device)
        values = values.to(device)
        out = torch.zeros(self.num_modules + 1, dtype=values.dtype, device=device)
        return out.index_add_(0, group, values.index_select(0, source))


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
