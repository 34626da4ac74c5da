"""Helpers of the robustness tests: a plain-PyTorch recorder and bare-vs-watched fits."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import make_trainer, read_scalars
from lightning.pytorch import Callback
from torch import nn

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def hook_count(model: nn.Module) -> int:
    """Every module hook and every parameter hook registered on ``model``."""
    total = sum(len(getattr(m, d, {})) for m in model.modules() for d in HOOK_DICTS)
    total += sum(len(p._backward_hooks or {}) for p in model.parameters() if hasattr(p, "_backward_hooks"))
    return total


def sq(t: torch.Tensor) -> float:
    """Plain-PyTorch squared L2 norm (of ``|z|`` for complex ``t``), in float64."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return float(torch.linalg.vector_norm(t.to(torch.complex128 if t.is_complex() else torch.float64)) ** 2)


class Recorder(Callback):
    """Losses and, per Lightning step, each distinct parameter's gradient and weights (plain PyTorch).

    ``grads[step][name]`` is the squared gradient norm the optimizer step sees; ``before``/``after``
    the weights around the step (float64 copies), keyed by the first name of each parameter.
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: dict[int, dict[str, float]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: dict[int, list] = {}

    @staticmethod
    def _step(trainer) -> int:
        return trainer.fit_loop.epoch_loop._batches_that_stepped

    @staticmethod
    def _params(module) -> dict[str, nn.Parameter]:
        return dict(module.named_parameters())  # distinct parameters, first name of a tied one

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.setdefault(self._step(trainer), []).append([t.detach().clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = self._step(trainer)
        params = self._params(pl_module)
        self.grads[step] = {n: sq(p.grad) for n, p in params.items() if p.grad is not None}
        self.before[step] = {n: _full(p).clone() for n, p in params.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))
        step = self._step(trainer)  # the counter advances after this hook
        self.after[step] = {n: _full(p).clone() for n, p in self._params(pl_module).items()}

    def update(self, step: int, names) -> float:
        return math.sqrt(sum(sq(self.after[step][n] - self.before[step][n]) for n in names))

    def weight(self, step: int, names) -> float:
        return math.sqrt(sum(sq(self.before[step][n]) for n in names))

    def grad(self, step: int, names) -> float:
        return math.sqrt(sum(self.grads[step][n] for n in names if n in self.grads[step]))


def _full(p: torch.Tensor) -> torch.Tensor:
    t = p.detach()
    if hasattr(t, "full_tensor"):  # a DTensor: the reference gathers, the monitors must not
        t = t.full_tensor()
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def fit_bare_and_watched(
    tmp_path: Path,
    make_model: Callable[[], pl.LightningModule],
    make_loader: Callable[[], object],
    watch_factory: Callable[[], Callback],
    **trainer_kwargs,
):
    """Fit a fresh model twice from one seed, without and with ``watch_factory()``.

    Returns ``(bare Recorder, watched Recorder, scalars logged by the watched run, watched model,
    warnings raised during the watched fit)``.
    """
    out = []
    for watched in (False, True):
        torch.manual_seed(0)
        model = make_model()
        recorder = Recorder()
        callbacks = [recorder] + ([watch_factory()] if watched else [])
        recorder.watch = callbacks[-1] if watched else None  # the Watch, for its last snapshot
        root = tmp_path / ("watched" if watched else "bare")
        trainer = make_trainer(root, callbacks, **trainer_kwargs)
        torch.manual_seed(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, make_loader())
        out.append((recorder, model, trainer, caught))
    (bare, _, _, _), (rec, model, trainer, caught) = out
    scalars = read_scalars(trainer.logger.log_dir) if trainer.logger is not None else {}
    return bare, rec, scalars, model, caught


def last(scalars: dict, tag: str) -> tuple[int, float]:
    """Step and value of the last point of ``tag``."""
    assert tag in scalars, f"{tag} not logged; have {sorted(t for t in scalars if 'global' in t)[:20]}"
    return scalars[tag][-1]
