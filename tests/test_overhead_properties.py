"""Cheap by design, proven without timing: no host sync off logging steps, one hook pass per module call."""

from __future__ import annotations

import traceback

import pytest
import torch
from conftest import TinyRegressor, make_trainer, regression_loader
from lightning.pytorch import Callback
from torch import nn

from lightning_watch import Watch
from lightning_watch.capture import CaptureEngine

#: Tensor methods that copy a value to the host: on an accelerator each one waits for the device.
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class Phase(Callback):
    """Knows whether the running batch is a logging step (every 4th step here).

    Put first in the callback list: its flag is set before the monitors' batch-start hooks and
    stays set through their batch-end hooks (where publication happens).
    """

    logging = False

    def on_train_start(self, trainer, pl_module):
        Phase.logging = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        Phase.logging = (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % 4 == 0


def _from_lightning_watch() -> str | None:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/lightning_watch/" in frame.filename.replace("\\", "/"):
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
    return None


@pytest.fixture
def sync_log(monkeypatch):
    calls: list[tuple[bool, str, str]] = []  # (during a logging step, method, where)
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, __original=original, __name=name, **kwargs):
            where = _from_lightning_watch()
            if where is not None:
                calls.append((Phase.logging, __name, where))
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_monitors_read_the_device_only_on_logging_steps(tmp_path, sync_log):
    torch.manual_seed(0)
    model = TinyRegressor()
    watch = Watch(log_every_n_steps=4, sample_every_n_steps=1, alerts=False)
    trainer = make_trainer(tmp_path, [Phase(), watch], max_steps=8, log_every_n_steps=4, gradient_clip_val=1.0)
    trainer.fit(model, regression_loader(n=128))
    off_steps = [c for c in sync_log if not c[0]]
    assert off_steps == [], off_steps
    on_steps = [c for c in sync_log if c[0]]
    # exactly one read per logging step, and it is the documented one
    assert len(on_steps) == 2
    assert all(name == "tolist" and "read_blocks" in where for _, name, where in on_steps)


def test_the_whole_watch_with_alerts_syncs_only_on_logging_steps(tmp_path, sync_log):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [Phase(), Watch(log_every_n_steps=4)], max_steps=8, log_every_n_steps=4)
    trainer.fit(TinyRegressor(), regression_loader(n=128, shuffle=True))
    # Allowed: the one-time fit-start checks (alerts/checks.py), and the non-finite loss guard,
    # which reads its flag directly only for CPU tensors (no device to wait for) and uses an
    # asynchronous copy and a CUDA event on a GPU (alerts/loss.py).
    off_steps = [c for c in sync_log if not c[0] and "push" not in c[2] and not c[2].startswith("checks.py")]
    assert off_steps == [], off_steps


class Deep(TinyRegressor):
    def __init__(self):
        super().__init__(net=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)))


def test_one_hook_call_per_module_call_whatever_the_number_of_monitors(tmp_path):
    torch.manual_seed(0)
    model = Deep()
    seen = {}

    class CountCalls(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = CaptureEngine.for_model(pl_module).hook_calls

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.hooks = CaptureEngine.for_model(pl_module).hook_count  # registered while the batch runs

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[batch_idx] = (CaptureEngine.for_model(pl_module).hook_calls - self.before, self.hooks)

    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=4, sample_every_n_steps=2), CountCalls()], max_steps=4)
    trainer.fit(model, regression_loader())
    # activation monitor: 5 modules; dead-unit monitor: 3 of the same modules -> 5 hooks, 5 calls
    assert seen == {0: (0, 0), 1: (5, 5), 2: (0, 0), 3: (5, 5)}
