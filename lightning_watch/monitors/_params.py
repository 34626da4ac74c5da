"""Parameters of the watched modules, grouped per module, with cached index tensors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_watch.monitors._base import WatchMonitor, strategy_shards_parameters
from lightning_watch.selection import owns_parameters
from lightning_watch.stats import group_norms


class ParameterTable:
    """Direct parameters of each watched module, and their per-module grouping.

    A parameter belongs to the module that registers it (``recurse=False``), so no parameter is
    counted twice when a container and its children are both watched.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> table = ParameterTable([("0", m[0]), ("2", m[2])])
        >>> [name for _, name, _ in table.entries]
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.module_names = [name for name, _ in modules]
        self.entries: list[tuple[int, str, nn.Parameter]] = [
            (index, f"{name}.{pname}", param)
            for index, (name, module) in enumerate(modules)
            for pname, param in module.named_parameters(recurse=False)
        ]
        self._group_of = {id(param): index for index, _, param in self.entries}
        self._index_cache: dict[tuple[int, ...], Tensor] = {}

    @property
    def num_modules(self) -> int:
        return len(self.module_names)

    def trainable(self) -> list[tuple[int, str, nn.Parameter]]:
        """Entries whose parameter currently requires a gradient (unfrozen layers are picked up)."""
        return [entry for entry in self.entries if entry[2].requires_grad]

    def group_index(self, params: Iterable[Tensor], device: torch.device) -> Tensor:
        """Module index of each parameter; parameters outside the table map to ``num_modules``.

        Cached per parameter list, so the index tensor is copied to the device once, not per step.
        """
        key = tuple(id(p) for p in params)
        index = self._index_cache.get(key)
        if index is None:
            values = [self._group_of.get(pid, self.num_modules) for pid in key]
            index = self._index_cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return index

    def per_module_squares(self, params: Sequence[Tensor], norms: list[Tensor], device: torch.device) -> Tensor:
        """Squared L2 norm per watched module from per-parameter norms (last slot: unwatched)."""
        index = self.group_index(params, device)
        return group_norms(norms, index, self.num_modules + 1).square_()


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
