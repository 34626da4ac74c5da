"""How far one optimizer step moves the weights of each watched module."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_watch.cadence import logging_step
from lightning_watch.monitors.params import ParameterMonitor
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import StatBlock, as_real, l2_norms, local_tensor, replica_weight


class ParameterDeltaMonitor(ParameterMonitor):
    """Logs ‖ΔW‖, ‖ΔW‖/‖W‖ and ‖W‖ per watched module: "are my weights changing at all?".

    On a logging step the trainable parameters of the watched modules are copied right before
    the first optimizer step of the batch (``on_before_optimizer_step``, after backward, when
    activations are already freed) and compared with their values at the end of the batch. The
    copy lives for that one step only: on logging steps peak memory grows by the size of the
    watched trainable parameters; on other steps nothing is kept. With several optimizers (manual
    optimization) the delta covers every step taken in that batch. A parameter that requires a
    gradient but is in no optimizer shows ``update_norm == 0``: the "stalled" signature.

    ``update_ratio`` near 1e-3 is the folk-healthy range for SGD-like training; orders of
    magnitude above means the learning rate is too high for that layer, far below means the layer
    barely learns.

    Args:
        **kwargs: selection and cadence arguments of :class:`~lightning_watch.monitors.WatchMonitor`.
            Default selection: every module that registers parameters itself.

    Logged Metrics:
        - ``watch.update_norm/<NN>.<module>``: ‖W_after − W_before‖ over the module's own trainable parameters.
        - ``watch.update_ratio/<NN>.<module>``: ``update_norm / param_norm`` (before the step).
        - ``watch.param_norm/<NN>.<module>``: ‖W‖ before the step.
        - ``watch.replica_spread/<NN>.<module>``: under DDP only, and only when replicas differ: relative
          spread across ranks of the module's parameter sum (raises ``replicas_out_of_sync``).
        - ``watch.global/update_ratio``: the same ratio over all watched trainable parameters.
        - ``watch.global/optimizer_steps``: optimizer steps taken in the logging batch (0 means
          no ``optimizer.step()`` ran: the deltas are 0 because nothing stepped).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ParameterDeltaMonitor()], logger=False)
    """

    METRICS = ("update_norm", "update_ratio", "param_norm")
    GLOBAL_METRICS = ("update_ratio", "optimizer_steps")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._clear()

    def _on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clear()

    def _on_teardown(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._before: list[Tensor] | None = None
        self._entries: list[tuple[int, str, nn.Parameter]] = []
        self._steps = 0
        self._result: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._checksum: Tensor | None = None  # per-module parameter sums (data-parallel runs)

    def _reset(self) -> None:
        self._clear()

    def _before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, step: int
    ) -> None:
        step = logging_step(trainer)
        if not self._cadence.is_log_step(step) or self._table is None:
            return
        self._steps += 1
        if self._before is None:
            self._entries = self._table.trainable()
            # local shards only (a DTensor's `to_local()`): the copy never gathers a sharded weight;
            # no_grad rather than a `detach` per parameter (each a dispatcher call of its own)
            with torch.no_grad():
                params = [local_tensor(p) for _, _, p in self._entries]
                # one fused copy of all watched trainable parameters, freed at the end of the batch
                self._before = torch._foreach_mul(params, 1.0) if params else []

    def _on_step_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if not self._cadence.is_log_step(step) or self._table is None:
            return
        with torch.no_grad():  # the parameters are read as they are, with no `detach` per parameter
            self._measure_step(trainer)
        self._before = None  # release the copy

    def _measure_step(self, trainer: pl.Trainer | None) -> None:
        stepped = self._before is not None  # else no optimizer step ran in this batch
        if not stepped:
            self._entries = self._table.trainable()
        self._checksum = None
        params = [p for _, _, p in self._entries]
        # sharded (DTensor) weights: local shards, each replicated placement counted once in the sum
        weights = [replica_weight(p) for p in params]
        after = [local_tensor(p) for p in params]
        m = self._table.num_modules
        if not after:
            zeros = torch.zeros(m + 1, device=self._device)
            self._result = (zeros, zeros, zeros, zeros[:2])
        else:
            if stepped:
                before_norms = l2_norms(self._before, weights)
                # the copy is ours and dies here: subtract in place rather than allocate a second copy
                torch._foreach_sub_(self._before, after)
                delta_norms = l2_norms(self._before, weights)  # ‖before - after‖ = ‖ΔW‖
                squares = torch.stack(delta_norms + before_norms).square().view(2, -1)
            else:  # nothing stepped: the weights are their own "before", and nothing moved
                before_sq = torch.stack(l2_norms(after, weights)).square()
                squares = torch.stack([torch.zeros_like(before_sq), before_sq])
            # one scatter-add for both rows; the whole model's squares (a tied weight counted once) are the rows' sums
            update_sq, param_sq = self._table.per_module(params, squares, self._device)
            count = self._table.grouping(params, self._device).counts
            self._result = (update_sq, param_sq, count, squares.sum(dim=1).to(self._device))
            if trainer is not None and trainer.world_size > 1 and not self._sharded:
                # replicas must hold equal weights: a float64 sum per parameter, compared across
                # ranks by the same read (max and min), catches one that drifted away
                sums = torch.stack([as_real(a).sum(dtype=torch.float64) for a in after]).to(self._device)
                self._checksum = self._table.per_module(params, sums.view(1, -1), self._device)[0]

    def _collect(self) -> StatBlock:
        block = StatBlock()
        m = self._table.num_modules if self._table is not None else 0
        zeros = torch.zeros(m + 1, device=self._device)
        result = self._result if self._result is not None else (zeros, zeros, zeros, zeros[:2])
        update_sq, param_sq, count, totals = result
        add = block.add_sum if self._sharded else block.add_max
        add(self._key("update_sq"), update_sq[:m])
        add(self._key("param_sq"), param_sq[:m])
        add(self._key("total_sq"), totals)
        checksum = self._checksum
        if checksum is not None:
            block.add_max(self._key("checksum_max"), checksum[:m])
            block.add_min(self._key("checksum_min"), checksum[:m])
        block.add_max(self._key("count"), count[:m])
        block.add_max(self._key("steps"), zeros[0] + self._steps)
        block.add_max(self._key("measured"), zeros[0] + (self._result is not None))
        return block

    def _finalize(self, values: dict[str, Any], snapshot: Snapshot) -> None:
        if not values[self._key("measured")]:
            return
        rows = zip(
            self._table.module_names,
            values[self._key("update_sq")],
            values[self._key("param_sq")],
            values[self._key("count")],
        )
        for name, update_sq, param_sq, count in rows:
            if not count:
                continue  # frozen module: nothing to move
            update, param = math.sqrt(update_sq), math.sqrt(param_sq)
            snapshot.put("update_norm", update, name)
            snapshot.put("param_norm", param, name)
            snapshot.put("update_ratio", _ratio(update, param), name)
        total_update, total_param = values[self._key("total_sq")]
        highs, lows = values.get(self._key("checksum_max")), values.get(self._key("checksum_min"))
        for name, high, low in zip(self._table.module_names, highs or (), lows or ()):
            spread = abs(high - low) / max(abs(high), abs(low), 1e-30)
            if spread > 0 or math.isnan(spread):  # written only when replicas differ: healthy runs log nothing
                snapshot.put("replica_spread", spread, name)
        snapshot.put("update_ratio", _ratio(math.sqrt(total_update), math.sqrt(total_param)))
        snapshot.put("optimizer_steps", values[self._key("steps")])

    def _histograms(self) -> dict[str, Tensor]:
        if self._table is None:
            return {}
        # sharded weights: rank zero's local shard (a histogram never gathers a whole tensor)
        return {f"watch_hist/weight/{name}": local_tensor(p.detach()) for _, name, p in self._table.trainable()}


def _ratio(update: float, param: float) -> float:
    if param == 0.0:
        return math.inf if update > 0 else 0.0
    return update / param
