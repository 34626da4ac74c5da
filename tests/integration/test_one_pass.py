"""One pass over each module's output, shared by every monitor; no hook at all off sampled steps.

The test counts module calls with its own forward *pre*-hooks, so ``module._forward_hooks`` holds
only what ``lightning_watch`` registered, and compares them with the engine's hook invocations.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TinyRegressor, make_trainer, regression_loader
from lightning.pytorch import Callback
from torch import nn

from lightning_watch import ActivationScaleMonitor, DeadUnitMonitor, GradientNormMonitor, Watch
from lightning_watch.capture import CaptureEngine

SAMPLE_EVERY = 2


class Reused(TinyRegressor):
    """One ReLU instance called twice per forward, a Tanh, three Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.act, self.squash = nn.ReLU(), nn.Tanh()
        del self.net

    def forward(self, x):
        return self.l3(self.squash(self.act(self.l2(self.act(self.l1(x))))))


class HookCensus(Callback):
    """Per training batch: module calls (own pre-hooks), engine hook calls, hooks registered."""

    def __init__(self, watched: set[str]) -> None:
        self.watched = watched
        self.per_batch: list[dict] = []

    def on_fit_start(self, trainer, pl_module):
        self.calls = dict.fromkeys(self.watched, 0)
        self.modules = dict(pl_module.named_modules())
        for name in self.watched:
            self.modules[name].register_forward_pre_hook(self._count(name))

    def _count(self, name):
        def pre_hook(module, args):
            if module.training:
                self.calls[name] += 1

        return pre_hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls = dict.fromkeys(self.watched, 0)
        self.engine_calls = CaptureEngine.for_model(pl_module).hook_calls

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # after the forward pass, before the monitors disarm: the hooks that were live this batch
        self.live = {name: len(module._forward_hooks) for name, module in self.modules.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        engine = CaptureEngine.for_model(pl_module)
        self.per_batch.append(
            {
                "module_calls": sum(self.calls.values()),
                "hook_calls": engine.hook_calls - self.engine_calls,
                "live": dict(self.live),
            }
        )


def _fit(tmp_path, callbacks, watched, steps=6):
    torch.manual_seed(0)
    census = HookCensus(watched)
    trainer = make_trainer(tmp_path, [*callbacks, census], max_steps=steps, log_every_n_steps=4)
    trainer.fit(Reused(), regression_loader(n=128))
    return census.per_batch


def _is_sampled(batch_idx: int) -> bool:
    # Cadence: every SAMPLE_EVERY-th step, and every logging step (the 4th)
    return (batch_idx + 1) % SAMPLE_EVERY == 0 or (batch_idx + 1) % 4 == 0


def test_watch_hooks_each_watched_module_once_and_nothing_off_sampled_steps(tmp_path):
    watch = Watch(sample_every_n_steps=SAMPLE_EVERY, alerts=False)
    watched = {"l1", "l2", "l3", "act", "squash"}  # activation scale watches all; dead units a subset
    per_batch = _fit(tmp_path, [watch], watched)
    names = {n for m in watch.monitors for n in m.module_names}
    assert names == watched  # the union of every monitor's selection (read after the fit)

    for batch_idx, seen in enumerate(per_batch):
        if _is_sampled(batch_idx):
            # `act` runs twice per forward: 6 module calls, 6 hook calls, whatever the monitors
            assert seen["module_calls"] == 6
            assert seen["hook_calls"] == 6, (batch_idx, seen)
            assert {n: c for n, c in seen["live"].items() if c} == dict.fromkeys(watched, 1)
        else:
            assert seen["hook_calls"] == 0, (batch_idx, seen)
            assert sum(seen["live"].values()) == 0, (batch_idx, seen)  # zero hooks registered


@pytest.mark.parametrize("cadences", [(SAMPLE_EVERY, SAMPLE_EVERY), (SAMPLE_EVERY, 1)], ids=["same", "different"])
def test_watch_and_two_separate_monitors_side_by_side_share_one_hook_per_module(tmp_path, cadences):
    watch_every, alone_every = cadences
    callbacks = [
        Watch(sample_every_n_steps=watch_every, alerts=False),
        ActivationScaleMonitor(sample_every_n_steps=alone_every),
        DeadUnitMonitor(sample_every_n_steps=alone_every),
        GradientNormMonitor(),  # no capture: adds no forward hook
    ]
    watched = {"l1", "l2", "l3", "act", "squash"}
    per_batch = _fit(tmp_path, callbacks, watched)
    sampled_by_anyone = _is_sampled if alone_every != 1 else (lambda _: True)

    for batch_idx, seen in enumerate(per_batch):
        live = {n: c for n, c in seen["live"].items() if c}
        if sampled_by_anyone(batch_idx):
            # three capturing consumers, yet one hook and one call per module call
            assert seen["hook_calls"] == seen["module_calls"] == 6, (batch_idx, seen)
            assert live == dict.fromkeys(watched, 1), (batch_idx, live)
        else:
            assert seen["hook_calls"] == 0 and live == {}, (batch_idx, seen)


def test_hooks_are_gone_after_fit(tmp_path):
    model = Reused()
    trainer = make_trainer(tmp_path, [Watch(sample_every_n_steps=1), ActivationScaleMonitor()], max_steps=3)
    trainer.fit(model, regression_loader(n=64))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
