"""Dead units: units that never fire over a window, whatever way the activation is written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim import Optimizer

from lightning_watch.capture import CapturedOutput
from lightning_watch.monitors.base import WatchMonitor
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock, StateRegistry, grad_rows_alive, spread_units
from lightning_watch.warn import warn_once

#: Activations whose units can die: their output is exactly 0 for every input at or below a
#: threshold, so a unit that never gets a positive output also never gets a gradient.
RECTIFIER_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

#: Layers whose units are rows of their weight (the gradient criterion).
WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


def _weight_leaf(module: nn.Module) -> tuple[Tensor | None, str | None]:
    """The leaf tensor whose gradient rows are the layer's units, or ``(None, why not)``.

    Never reads ``module.weight`` of a parametrized layer: that runs the parametrization (for
    spectral norm a power iteration that updates buffers and changes training), and its ``.grad``
    is a non-leaf's. Weight normalization (``W = g * V / ||V||`` per unit) keeps a unit's gradient
    row zero in ``V``; spectral normalization and orthogonal maps mix rows, so a leaf row says
    nothing exact about a unit.
    """
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations.weight
        kind = type(plist[0]).__name__ if len(plist) == 1 else "several parametrizations"
        if kind == "_WeightNorm" and getattr(plist[0], "dim", None) == 0:
            return plist.original1, None
        return None, f"its weight is parametrized ({kind}), which mixes the gradient rows of the leaf"
    params = module._parameters
    if "weight_orig" in params:  # legacy torch.nn.utils.spectral_norm: `weight` is a computed attribute
        return None, "its weight is spectrally normalized, which mixes the gradient rows of the leaf"
    if "weight_v" in params and "weight_g" in params:  # legacy torch.nn.utils.weight_norm
        dims = [getattr(h, "dim", None) for h in module._forward_pre_hooks.values() if hasattr(h, "name")]
        if dims == [0]:
            return params["weight_v"], None
        return None, "its weight is normalized along a dimension other than its units"
    weight = params.get("weight")
    return weight, None


def _gradient_unit_dim(module: nn.Module) -> int | None:
    """The unit dimension of a layer judged by its weight's gradient rows; ``None``: judged by its output."""
    return _weight_unit_dim(module) if isinstance(module, WEIGHTED_TYPES) else None


def _weight_unit_dim(module: nn.Module) -> int | None:
    weight, _ = _weight_leaf(module)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # weight is (in, out / groups, *k): units are dim 1 only when there is one group
        return 1 if module.groups == 1 else None
    return 0


class DeadUnitMonitor(WatchMonitor):
    """Logs, per layer, the fraction of units that never fired over the logging window.

    Two criteria, one per kind of module, both evaluated on the sampled batches of the window:

    - **rectifier modules** (``nn.ReLU``, ``nn.ReLU6``): a unit (feature, or channel for
      ``N, C, ...`` outputs) is dead when its output was never > 0 for any sample, position or
      call in the window.
    - **weighted layers** (``nn.Linear``, ``nn.ConvNd``; ``ConvTranspose`` with one group): a unit
      (output feature or channel) is dead when its weight gradient row was exactly zero at every
      sampled optimizer step. This catches a dying ReLU however it is written (``F.relu``,
      ``torch.clamp(min=0)``, a module) because a unit that never fires passes no gradient. It
      also flags units cut off from the loss for other reasons, which is worth seeing too.

    Under DDP a unit is dead only if it is dead on every rank. Windows survive a checkpoint resume.

    Args:
        **kwargs: selection and cadence arguments of :class:`~lightning_watch.monitors.WatchMonitor`.
            Default selection: rectifier modules and weighted layers.

    Logged Metrics:
        - ``watch.dead_frac/<NN>.<module>``: dead units / units, in ``[0, 1]``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[DeadUnitMonitor(log_every_n_steps=100)], logger=False)
    """

    METRICS = ("dead_frac",)
    CAPTURES_OUTPUTS = True

    def _default_module(self, module: nn.Module) -> bool:
        if isinstance(module, RECTIFIER_TYPES):
            return True
        if not isinstance(module, WEIGHTED_TYPES):
            return False
        if _weight_unit_dim(module) is None:
            _, why = _weight_leaf(module)
            if why:  # say so once, rather than leave the layer silently without `dead_frac`
                warn_once(
                    ("dead_unit.leaf", type(module).__name__, why),
                    f"lightning_watch: DeadUnitMonitor skips {type(module).__name__} layers whose gradient "
                    f"rows are not their units ({why}); their gradient norms and deltas are still measured.",
                )
            return False
        return True

    def _declare_state(self, state: StateRegistry) -> None:
        # weighted layers use the gradient criterion, every other module its output
        self._grad_dims = [_gradient_unit_dim(module) for _, module in self._modules]
        for index, (_, module) in enumerate(self._modules):
            dim = self._grad_dims[index]
            # a weighted layer's size is known from its weight leaf (a parametrized weight's `original`,
            # read at fit start, after `configure_model`: FSDP2 swaps parameters there), so every rank
            # has the same layout; an activation's is known from its first output
            shape = (lambda m=module, d=dim: (_weight_leaf(m)[0].shape[d],)) if dim is not None else None
            state.declare(f"alive.{index}", shape, reduce="max", dtype=torch.bool)
        # samples seen per module in the window; a module with none reports nothing
        state.declare("seen", (len(self._modules),), reduce="sum", host=True)

    def _on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the leaf whose gradient is read (a parametrized weight's `original`): read once per fit
        self._leaves = [
            _weight_leaf(module)[0] if dim is not None else None
            for dim, (_, module) in zip(self._grad_dims, self._modules)
        ]

    def _uncaptured(self) -> set[int]:
        # weighted layers are judged by their gradients: their outputs need no hook
        return {index for index, (_, module) in enumerate(self._modules) if _gradient_unit_dim(module) is not None}

    def consume(self, index: int, captured: CapturedOutput) -> None:
        if self._grad_dims[index] is not None:
            return  # weighted layers are judged by their gradients
        alive = captured.alive()
        if captured.producer is not None:  # a column-parallel producer: its output holds this rank's units
            alive = spread_units(alive, _weight_leaf(captured.producer)[0])
        current = self.state[f"alive.{index}"]
        if current is None or current.shape != alive.shape:
            self.state[f"alive.{index}"] = alive.clone()
        else:
            current.logical_or_(alive)
        self.state["seen"][index] += 1

    def _before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, step: int
    ) -> None:
        if not self._sampling:
            return
        for index, leaf in enumerate(self._leaves):
            grad = leaf.grad if leaf is not None else None
            if grad is not None:
                dim = self._grad_dims[index]
                self.state[f"alive.{index}"].logical_or_(grad_rows_alive(grad, dim))
                self.state["seen"][index] += 1

    def _collect(self) -> StatBlock:
        return self.state.block(self._key("state"))

    def _finalize(self, values: Mapping[str, Any], snapshot: Snapshot) -> None:
        seen = values[self._key("state.seen")]
        for index, (name, _) in enumerate(self._modules):
            bits = values.get(self._key(f"state.alive.{index}"))
            if bits and seen[index]:
                snapshot.put("dead_frac", 1.0 - sum(bits) / len(bits), name)
