"""No host-device sync on steps that do not log, proven by tracing (not timing).

On a GPU, every read of a device tensor by the host (``.item()``, ``.tolist()``, ``.cpu()``,
``bool(t)``, ``float(t)``, ``t.to("cpu")``, ...) waits for the device to finish its queue. The
tests below spy on every such method while a ``Watch`` trains on the CPU and record the calls made
from ``lightning_watch`` code (found by walking the Python stack), split by whether the running
batch is a logging step. A GPU variant, skipped without CUDA, lets PyTorch itself turn any
synchronizing call into an error (``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from helpers import TinyRegressor, make_trainer, regression_loader
from lightning.pytorch import Callback
from torch import nn

from lightning_watch import Watch

LOG_EVERY = 4
#: Tensor methods that bring a value to the host; on an accelerator each one waits for the device.
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
PACKAGE = os.sep + "lightning_watch" + os.sep


class Phase(Callback):
    """Labels the running batch: ``"setup"``, ``"first"`` (batch 0), then ``"log"`` or ``"plain"``.

    It must come first in the callback list, so the label is set before the monitors' batch-start
    hooks run and stays set through their batch-end hooks, where publication happens.
    """

    def __init__(self) -> None:
        self.label = "setup"
        self.steps: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if batch_idx == 0:
            self.label = "first"  # EarlyAlerts runs its one-time checks on the first batch
        else:
            self.label = "log" if (step + 1) % LOG_EVERY == 0 else "plain"
        self.steps.append(self.label)

    def on_train_end(self, trainer, pl_module):
        self.label = "end"


def _caller_in_package() -> str | None:
    """``file:line function`` of the innermost ``lightning_watch`` frame on the stack, if any."""
    frame = sys._getframe(2)  # skip the spy itself
    while frame is not None:
        filename = frame.f_code.co_filename
        if PACKAGE in filename:
            return f"{os.path.basename(filename)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return None


@pytest.fixture
def reads(monkeypatch):
    """Spies on every host-reading Tensor method; yields ``(phase, record)`` to fill per test."""
    phase = Phase()
    calls: list[tuple[str, str, str]] = []  # (phase label, method, where in lightning_watch)

    def record(method: str) -> None:
        where = _caller_in_package()
        if where is not None:
            calls.append((phase.label, method, where))

    for name in READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, __original=original, __name=name, **kwargs):
            record(__name)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    original_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
            record("to(cpu)")
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    return phase, calls


class Deep(TinyRegressor):
    """Linear, ReLU, Tanh and a reused ReLU: every monitor has something to measure."""

    def __init__(self) -> None:
        super().__init__(net=nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)))


def test_spy_sees_reads_from_the_package(reads):
    # the spy itself must work, or every assertion below would pass vacuously
    from lightning_watch.stats import StatBlock, read_blocks

    _, calls = reads
    block = StatBlock()
    block.add_sum("x", torch.tensor([1.0, 2.0]))
    read_blocks([block])
    torch.tensor(3.0).item()  # from the test, not from the package: not recorded
    assert [(method, where.split(":")[0]) for _, method, where in calls if method in READS] == [("tolist", "reduce.py")]
    # an entry on another device than the read's is moved there (here a meta tensor, which has no data to copy)
    block.add_sum("y", torch.zeros(1, device="meta"))
    with pytest.raises(NotImplementedError, match="meta"):
        read_blocks([block])
    assert ("to(cpu)", "reduce.py") in [(method, where.split(":")[0]) for _, method, where in calls]


def _cpu_only(call: tuple[str, str, str]) -> bool:
    """A read through ``kernels.cpu_values``: CPU tensors only (it raises on an accelerator), so no sync anywhere."""
    return call[2].endswith(" cpu_values")


def test_cpu_only_reads_refuse_accelerator_tensors():
    from lightning_watch.stats.kernels import cpu_values

    assert cpu_values(torch.tensor(2.0), torch.tensor([1.0, float("nan")]))[:2] == [2.0, 1.0]
    with pytest.raises(ValueError, match="CPU tensors only"):
        cpu_values(torch.zeros(1, device="meta"))


def test_watch_reads_the_device_once_per_logging_step_and_never_otherwise(tmp_path, reads):
    """Every monitor measuring every step (the worst case), gradient clipping on, no alerts."""
    phase, calls = reads
    torch.manual_seed(0)
    watch = Watch(log_every_n_steps=LOG_EVERY, sample_every_n_steps=1, alerts=False)
    trainer = make_trainer(tmp_path, [phase, watch], max_steps=12, log_every_n_steps=LOG_EVERY, gradient_clip_val=1.0)
    trainer.fit(Deep(), regression_loader(n=256))

    assert phase.steps.count("plain") == 8 and phase.steps.count("log") == 3
    assert [c for c in calls if c[0] in ("first", "plain") and not _cpu_only(c)] == []
    # `.to(cpu)` counts as a read off logging steps (strict); on them, read_blocks moves tensors
    # to their own device, which is no transfer, so only the value reads are counted there
    logging_reads = [c for c in calls if c[0] == "log" and c[1] in READS and not _cpu_only(c)]
    # exactly one host transfer per logging step, and it is read_blocks' documented `tolist`
    assert len(logging_reads) == 3, logging_reads
    assert all(method == "tolist" and "read_blocks" in where for _, method, where in logging_reads)
    # what was read is real: the last snapshot holds the logged statistics
    assert watch.last_snapshot is not None and watch.last_snapshot.per_module["grad_norm"]


def test_default_watch_with_alerts_reads_nothing_off_logging_steps(tmp_path, reads):
    """``Watch()`` as users leave it on: no host read at all on a plain step, the loss included.

    The one-time checks of the first batch (``alerts/checks.py``) are allowed to read: they run once.
    Each batch's loss is only kept; the kept losses are folded into the window on sampled steps
    (here every logging step: ``LOG_EVERY`` is below the default sampling floor), where the CPU
    loss window reads them in one ``tolist`` (no device to wait for; on a GPU the fold stays on the
    device and the guard polls a CUDA event, covered by the GPU test below).
    """
    phase, calls = reads
    torch.manual_seed(0)
    watch = Watch(log_every_n_steps=LOG_EVERY)
    trainer = make_trainer(tmp_path, [phase, watch], max_steps=12, log_every_n_steps=LOG_EVERY)
    trainer.fit(Deep(), regression_loader(n=256, shuffle=True))

    assert watch.monitors[0].cadence.sample == LOG_EVERY  # plain steps sample nothing
    assert phase.steps.count("plain") == 8
    assert [c for c in calls if c[0] == "plain"] == []
    folds = [c for c in calls if c[0] == "log" and "loss.py" in c[2]]
    assert folds and all(method == "tolist" and "fold" in where for _, method, where in folds), folds
    first = [c for c in calls if c[0] == "first"]
    assert all("checks.py" in where or "fold" in where for _, _, where in first), first


class CudaRegressor(Deep):
    pass


class SyncTrap(Callback):
    """Turns synchronizing CUDA calls into errors inside non-logging batches (after warm-up)."""

    def __init__(self) -> None:
        self.trapped = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if batch_idx >= 2 and (step + 1) % LOG_EVERY != 0:
            self.trapped += 1
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, *args):
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_sync_on_a_gpu_off_logging_steps(tmp_path):
    """PyTorch's own sync detector: bare Lightning passes, so any error would be ours."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    data = DataLoader(TensorDataset(x.cuda(), x.sum(1, keepdim=True).cuda()), batch_size=16, shuffle=False)
    try:
        every = {"log_every_n_steps": LOG_EVERY}
        for callbacks in (
            [],
            [Watch(**every)],
            [Watch(**every, sample_every_n_steps=1, histogram_every_n_steps=LOG_EVERY)],
        ):
            trap = SyncTrap()
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer = make_trainer(
                    tmp_path, [*callbacks, trap], max_steps=12, log_every_n_steps=LOG_EVERY, accelerator="gpu"
                )
                trainer.fit(CudaRegressor(), data)
            assert trap.trapped == 7
    finally:
        torch.cuda.set_sync_debug_mode(0)
