"""Gradient norms per watched module and for the whole model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_watch.cadence import logging_step
from lightning_watch.monitors.params import ParameterMonitor
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock, constant, l2_norms, local_tensor, nonfinite_counts, replica_weight


class GradientNormMonitor(ParameterMonitor):
    """Logs the L2 norm of the gradients of each watched module and of the whole model.

    Gradients are measured in ``on_before_optimizer_step``: once per optimizer step (after
    gradient accumulation), after AMP unscaling and **before** gradient clipping. When the
    Trainer clips (``gradient_clip_val``), the norm after clipping is measured too, right after
    the optimizer step, so "is clipping active?" is answered by comparing the two. Non-finite
    gradient values are counted, never hidden. Work happens on logging steps only.

    Args:
        per_parameter: also log one norm per parameter (``watch.grad_norm/<NN>.<module>.<param>``).
        **kwargs: selection and cadence arguments of :class:`~lightning_watch.monitors.WatchMonitor`.
            Default selection: every module that registers parameters itself.

    Logged Metrics:
        - ``watch.grad_norm/<NN>.<module>``: L2 norm of the module's own parameters' gradients.
        - ``watch.grad_nonfinite/<NN>.<module>``: number of NaN/Inf gradient values in the module.
        - ``watch.global/grad_norm``: L2 norm over all gradients the optimizers step (pre-clip).
        - ``watch.global/grad_norm_clipped``: the same after clipping (only when clipping is on).
        - ``watch.global/grad_nonfinite``: number of NaN/Inf gradient values in the model.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[GradientNormMonitor(include="encoder.*")], logger=False)
    """

    METRICS = ("grad_norm", "grad_nonfinite")
    GLOBAL_METRICS = ("grad_norm", "grad_norm_clipped", "grad_nonfinite")

    def __init__(self, per_parameter: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(per_parameter, bool):
            raise ValueError(f"`per_parameter` must be True or False, got {per_parameter!r}.")
        self.per_parameter = per_parameter
        self._post_hooks: list = []
        self._clipping = False
        self._reset_buffers()

    def _on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clipping = bool(trainer.gradient_clip_val) and pl_module.automatic_optimization
        # the post-step hook reads clipped norms: without clipping it would only cost every step a call
        self._post_hooks = (
            [opt.register_step_post_hook(self._after_optimizer_step) for opt in trainer.optimizers]
            if self._clipping
            else []
        )
        self._reset_buffers()
        self._trainer = trainer

    def _on_teardown(self) -> None:
        for handle in self._post_hooks:
            handle.remove()
        self._post_hooks = []
        self._trainer = None
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self._module_sq: Tensor | None = None
        self._module_nonfinite: Tensor | None = None
        self._module_count: Tensor | None = None
        self._global_nonfinite: Tensor | None = None
        self._measured: set[int] = set()  # ids of parameters measured in this logging batch
        self._global_sq: Tensor | None = None
        self._clipped_sq: Tensor | None = None
        self._param_norms: dict[str, Tensor] = {}
        self._grads_for_histogram: dict[str, Tensor] = {}

    def _reset(self) -> None:
        self._reset_buffers()

    # ------------------------------------------------------------------ measurement
    def _is_due(self, trainer: pl.Trainer) -> tuple[bool, bool]:
        step = logging_step(trainer)
        cadence = self._cadence
        return cadence.is_log_step(step), cadence.is_histogram_step(step)

    def _before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, step: int
    ) -> None:
        due_log, due_hist = self._is_due(trainer)
        if not (due_log or due_hist) or self._table is None:
            return
        params = _params_with_grad(optimizer)
        if due_hist:
            names = {id(p): name for _, name, p in self._table.entries}
            self._grads_for_histogram.update(
                # a sharded gradient: this rank's shard (a histogram never gathers a whole tensor)
                {
                    f"watch_hist/grad/{names[id(p)]}": local_tensor(p.grad.detach()).clone()
                    for p in params
                    if id(p) in names
                }
            )
        if not due_log:
            return
        params = [p for p in params if id(p) not in self._measured]
        self._measure(params, in_global=True)

    def _on_step_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if not self._cadence.is_log_step(step) or self._table is None:
            return
        # Gradients no optimizer stepped in this batch (a parameter outside every optimizer, or a
        # forgotten `opt.step()` in manual optimization) are still shown per module: "gradients
        # arrive but the weights do not move" is exactly what the user needs to see.
        stragglers = [p for _, _, p in self._table.trainable() if p.grad is not None and id(p) not in self._measured]
        self._measure(stragglers, in_global=False)
        self._measured = set()

    def _measure(self, params: Sequence[Tensor], in_global: bool) -> None:
        if not params:
            return
        self._measured.update(id(p) for p in params)
        grads = [p.grad for p in params]
        # a DTensor gradient is measured on its local shard; a replicated one counts once in the sum
        weights = [replica_weight(g) for g in grads]
        norms = l2_norms(grads, weights)
        # counting non-finite values is a pass per tensor: logging steps only, and on the CPU only where a
        # norm is not finite
        nonfinite = nonfinite_counts(grads, norms).to(self._device)
        if any(w != 1.0 for w in weights):
            # the same shards' weights at every logging step: made on the device once
            nonfinite = nonfinite * constant(tuple(weights), nonfinite.dtype, self._device)
        # squared norms and non-finite counts per parameter (`stack` promotes to the wider dtype): one
        # scatter-add gives both per module
        rows = torch.stack([torch.stack(norms).square().to(self._device), nonfinite])
        module_sq, module_nonfinite = self._table.per_module(params, rows, self._device)
        # several optimizers in one batch (manual optimization) add up
        self._module_sq = _add(self._module_sq, module_sq)
        self._module_nonfinite = _add(self._module_nonfinite, module_nonfinite)
        self._module_count = _add(self._module_count, self._table.grouping(params, self._device).counts)
        if in_global:
            global_sq, global_nonfinite = rows.sum(dim=1)
            self._global_sq = _add(self._global_sq, global_sq)
            self._global_nonfinite = _add(self._global_nonfinite, global_nonfinite)
        if self.per_parameter:
            names = {id(p): name for _, name, p in self._table.entries}
            self._param_norms.update({names[id(p)]: n for p, n in zip(params, norms) if id(p) in names})

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        trainer = self._trainer
        if not self._clipping or trainer is None or not self._is_due(trainer)[0]:
            return
        params = _params_with_grad(optimizer)
        if not params:
            return
        # the step does not touch .grad, so what is left there is what clipping produced
        norms = l2_norms([p.grad for p in params])
        self._clipped_sq = _add(self._clipped_sq, torch.stack(norms).square().sum())

    # ------------------------------------------------------------------ publication
    def _collect(self) -> StatBlock:
        block = StatBlock()
        m = self._table.num_modules if self._table is not None else 0
        zeros = torch.zeros(m + 1, device=self._device)
        module_sq = _or(self._module_sq, zeros)
        nonfinite = _or(self._module_nonfinite, zeros)
        # Under DDP the gradients are already synchronized: every rank holds the same values, so
        # `max` returns them unchanged. Under sharded strategies each rank holds a shard: the
        # squares add up. Counts say what was measured at all; NaN norms are kept, not hidden.
        add = block.add_sum if self._sharded else block.add_max
        add(self._key("module_sq"), module_sq[:m])
        add(self._key("module_nonfinite"), nonfinite[:m])
        block.add_max(self._key("module_count"), _or(self._module_count, zeros)[:m])
        add(self._key("global_sq"), _or(self._global_sq, zeros[0]))
        add(self._key("global_nonfinite"), _or(self._global_nonfinite, zeros[0]))
        block.add_max(self._key("stepped"), zeros[0] + (self._global_sq is not None))
        if self._clipping:
            add(self._key("clipped_sq"), _or(self._clipped_sq, zeros[0] + math.nan))
        if self.per_parameter:
            nan = zeros[0] + math.nan
            names = [name for _, name, _ in self._table.entries]
            norms = torch.stack([self._param_norms.get(n, nan) for n in names]) if names else zeros[:0]
            add(self._key("param_sq"), norms.square())
        return block

    def _finalize(self, values: dict[str, Any], snapshot: Snapshot) -> None:
        rows = zip(
            self._table.module_names,
            values[self._key("module_sq")],
            values[self._key("module_nonfinite")],
            values[self._key("module_count")],
        )
        for name, sq, bad, count in rows:
            if count:
                snapshot.put("grad_norm", math.sqrt(sq), name)
                snapshot.put("grad_nonfinite", bad, name)
        if values[self._key("stepped")]:  # global values exist only if an optimizer stepped
            snapshot.put("grad_norm", math.sqrt(values[self._key("global_sq")]))
            snapshot.put("grad_nonfinite", values[self._key("global_nonfinite")])
        clipped = values.get(self._key("clipped_sq"), math.nan)
        if not math.isnan(clipped):
            snapshot.put("grad_norm_clipped", math.sqrt(clipped))
        if self.per_parameter:
            for (_, pname, _), sq in zip(self._table.entries, values[self._key("param_sq")]):
                if not math.isnan(sq):
                    snapshot.put("grad_norm", math.sqrt(sq), pname)

    def _histograms(self) -> dict[str, Tensor]:
        out, self._grads_for_histogram = self._grads_for_histogram, {}
        return out


def _params_with_grad(optimizer: Optimizer) -> Sequence[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value


def _or(value: Tensor | None, default: Tensor) -> Tensor:
    return default if value is None else value
