"""Lightning features: manual optimization, several optimizers, precision, fast_dev_run and validation."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyRegressor, make_trainer, read_scalars, regression_loader
from lightning.pytorch import Callback
from torch import nn

from lightning_watch import Watch
from lightning_watch.capture import CaptureEngine


class ManualTwoOptimizers(TinyRegressor):
    """Manual optimization with one optimizer per layer; ``step_second=False`` forgets one step."""

    def __init__(self, step_second: bool = True):
        super().__init__()
        self.automatic_optimization = False
        self.step_second = step_second

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        if self.step_second:
            second.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)


@pytest.mark.parametrize("step_second", [True, False])
def test_manual_optimization_with_two_optimizers(tmp_path, step_second):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2)], max_epochs=1)
    trainer.fit(ManualTwoOptimizers(step_second), regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    # manual optimization: Lightning's logging step advances once per batch
    assert [s for s, _ in scalars["watch/update_norm/net.0"]] == [1, 3]
    assert all(v > 0 for _, v in scalars["watch/update_norm/net.0"])
    if step_second:
        assert all(v > 0 for _, v in scalars["watch/update_norm/net.2"])
        assert all(v == 2 for _, v in scalars["watch/global/optimizer_steps"])
    else:  # the forgotten step is visible at a glance
        assert all(v == 0 for _, v in scalars["watch/update_norm/net.2"])
        assert all(v == 1 for _, v in scalars["watch/global/optimizer_steps"])
    assert all(v > 0 for _, v in scalars["watch/grad_norm/net.2"])


class NeverSteps(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self(x), y))  # and no opt.step()


def test_manual_optimization_that_never_steps_still_logs(tmp_path):
    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2)], max_epochs=1)
    trainer.fit(NeverSteps(), regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert [v for _, v in scalars["watch/global/optimizer_steps"]] == [0, 0]
    assert [v for _, v in scalars["watch/update_norm/net.0"]] == [0, 0]
    assert "watch/act_rms/net.0" in scalars
    assert all(v > 0 for _, v in scalars["watch/grad_norm/net.0"])  # gradients arrive, weights do not move
    assert "watch/global/grad_norm" not in scalars  # no optimizer stepped: no global norm to speak of


def test_bf16_mixed_precision_values_are_close_to_fp32(tmp_path):
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        trainer = make_trainer(tmp_path / precision, [Watch(log_every_n_steps=1)], max_steps=2, precision=precision)
        trainer.fit(TinyRegressor(), regression_loader())
        runs[precision] = read_scalars(trainer.logger.log_dir)
    for tag in ("watch/grad_norm/net.0", "watch/act_rms/net.0", "watch/update_norm/net.2"):
        full, half = runs["32-true"][tag][0][1], runs["bf16-mixed"][tag][0][1]
        assert math.isfinite(half)
        assert half == pytest.approx(full, rel=0.05), tag


def test_fast_dev_run_is_watched_every_step_and_validation_is_not(tmp_path):
    torch.manual_seed(0)
    calls = []

    class CountDuringValidation(Callback):
        def on_validation_start(self, trainer, pl_module):
            calls.append(CaptureEngine.for_model(pl_module).hook_calls)

        def on_validation_end(self, trainer, pl_module):
            calls.append(CaptureEngine.for_model(pl_module).hook_calls)

    watch = Watch()
    trainer = pl.Trainer(
        fast_dev_run=2, callbacks=[watch, CountDuringValidation()], enable_progress_bar=False, accelerator="cpu"
    )
    model = TinyRegressor()
    trainer.fit(model, regression_loader(), regression_loader(seed=1))
    assert calls and calls[0] == calls[1]  # no hook call during validation
    assert watch.last_snapshot is not None and watch.last_snapshot.modules("grad_norm")  # fast_dev_run logs every step
    assert all(not m._forward_hooks for m in model.modules())
