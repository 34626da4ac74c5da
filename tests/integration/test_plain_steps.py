"""A plain step costs no tensor operation: proven by counting every op PyTorch dispatches (not timing).

``Watch()``'s fast path (README, *Overhead*) promises that a step where nothing is due runs no kernel:
no hook on the model or the optimizer, no statistic, no read. Timing cannot show a few microseconds
on a shared machine, but PyTorch's dispatcher sees every operation: a ``TorchDispatchMode`` counts
them per training step, in a bare fit and in a watched fit of the same seeded model on the same
batches. On a plain step the two counts must be equal, operation by operation; on sampled and
logging steps the watched fit must do more (or the count would prove nothing).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch
from helpers import TinyRegressor, make_trainer, regression_loader
from lightning.pytorch import Callback
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_watch import Watch

STEPS = 60  # the Trainer's log_every_n_steps=50: Watch() logs at step 49, samples every 10 steps


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched during each training step (keyed by Lightning's step)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = -1  # before the first batch: setup, model moves
        self.per_step: defaultdict[int, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.per_step[self.step][str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class StepLabel(Callback):
    """First in the callback list: tells the counter which step the ops that follow belong to."""

    def __init__(self, counter: OpCounter) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter.step = trainer.fit_loop.epoch_loop._batches_that_stepped


def _ops_per_step(tmp_path, callbacks) -> dict[int, Counter]:
    torch.manual_seed(0)
    model = TinyRegressor(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)))
    counter = OpCounter()
    trainer = make_trainer(
        tmp_path, [StepLabel(counter), *callbacks], max_steps=STEPS, log_every_n_steps=50, logger=False
    )
    loader = regression_loader(n=16 * STEPS, batch_size=16)  # one epoch: no epoch boundary inside the fit
    with counter:
        trainer.fit(model, loader)
    return dict(counter.per_step)


@pytest.mark.parametrize("alerts", [True, False], ids=["with-alerts", "monitors-only"])
def test_watch_runs_no_tensor_op_on_plain_steps(tmp_path, alerts):
    bare = _ops_per_step(tmp_path / "bare", [])
    watch = Watch(alerts=alerts)
    watched = _ops_per_step(tmp_path / "watched", [watch])
    cadence = watch.monitors[0].cadence
    assert (cadence.log, cadence.sample) == (50, 10)

    # the first batches run the one-time checks (labels, framework warnings): plain steps come after them
    plain = [s for s in range(10, STEPS) if not cadence.is_sample_step(s)]
    busy = [s for s in range(10, STEPS) if cadence.is_sample_step(s)]
    assert len(plain) == 45 and busy == [19, 29, 39, 49, 59]
    differing = {s: watched[s] - bare[s] for s in plain if watched[s] != bare[s]}
    assert not differing, f"tensor operations on plain steps: {differing}"
    for step in busy:  # sampled and logging steps measure: the counter sees their work
        assert sum(watched[step].values()) > sum(bare[step].values()), step
