"""Lightning features: manual optimization, several optimizers, precision, fast_dev_run, validation, loggers."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyRegressor, make_trainer, read_scalars, regression_loader
from lightning.pytorch import Callback
from torch import nn

from lightning_watch import ActivationScaleMonitor, Watch
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


def test_fast_dev_run_and_validation_are_not_watched(tmp_path):
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


def test_histograms_and_custom_scalar_layout_are_in_the_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2, histogram_every_n_steps=2)], max_steps=4)
    trainer.fit(TinyRegressor(), regression_loader())
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0, "tensors": 0})
    acc.Reload()
    histograms = set(acc.Tags()["histograms"])
    expected = {"watch_hist/weight/net.0.weight", "watch_hist/grad/net.0.weight", "watch_hist/activation/net.1"}
    assert expected <= histograms
    weights = acc.Histograms("watch_hist/weight/net.0.weight")
    assert [h.step for h in weights] == [1, 3]
    assert weights[0].histogram_value.num == 8 * 4
    layout_events = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(layout_events[-1].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
    assert charts["grad_norm"] == [r"^watch\.grad_norm/"]
    assert charts["dead_frac"] == [r"^watch\.dead_frac/"]
    assert charts["global/grad_norm"] == [r"^watch\.global/grad_norm$"]


def test_csv_logger_and_several_loggers_get_the_same_scalars(tmp_path):
    import csv

    torch.manual_seed(0)
    loggers = [pl.loggers.CSVLogger(str(tmp_path), name="csv"), pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")]
    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2)], max_steps=4, logger=loggers)
    trainer.fit(TinyRegressor(), regression_loader())
    tb = read_scalars(loggers[1].log_dir, raw=True)
    with open(f"{loggers[0].log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    csv_tags = {k for row in rows for k, v in row.items() if k.startswith("watch.") and v != ""}
    assert csv_tags == {t for t in tb if t.startswith("watch.")}
    row = next(r for r in rows if r["watch.grad_norm/01.net.0"])
    assert float(row["watch.grad_norm/01.net.0"]) == pytest.approx(tb["watch.grad_norm/01.net.0"][0][1], rel=1e-6)


def test_validation_activations_when_asked(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor()
    monitor = ActivationScaleMonitor(validation=True, log_every_n_steps=2)
    trainer = make_trainer(tmp_path, [monitor], max_epochs=1)
    val = regression_loader(seed=1)
    trainer.fit(model, regression_loader(), val)
    scalars = read_scalars(trainer.logger.log_dir)
    x = torch.cat([xb for xb, _ in val])
    with torch.no_grad():
        expected = float(model.net[0](x).square().mean().sqrt())
    assert scalars["watch/val_act_rms/net.0"][-1][1] == pytest.approx(expected, rel=1e-5)
    assert all(not m._forward_hooks for m in model.modules())
