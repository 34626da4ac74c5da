"""ActivationScaleMonitor against a plain forward hook that stores every output of the sampled batches."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import StoreOutputs, TinyRegressor, make_trainer, read_scalars, regression_loader
from torch import nn

from lightning_watch import ActivationScaleMonitor


def _saturated(x: torch.Tensor, lo: float, hi: float, margin: float) -> float:
    edge = margin * (hi - lo)
    return float(((x <= lo + edge) | (x >= hi - edge)).double().mean())


class Squashing(TinyRegressor):
    def __init__(self, lr=0.05):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
        with torch.no_grad():
            net[0].weight.mul_(3.0)  # some saturation to count
            net[2].weight.mul_(6.0)
        super().__init__(net=net, lr=lr)


@pytest.mark.parametrize("margin", [0.01, 0.1])
def test_window_statistics_equal_a_reference_over_all_sampled_batches(tmp_path, margin):
    names = ["net.0", "net.1", "net.3", "net.4"]
    reference = StoreOutputs(names)
    monitor = ActivationScaleMonitor(log_every_n_steps=4, sample_every_n_steps=2, saturation_margin=margin)
    trainer = make_trainer(tmp_path, [reference, monitor], max_steps=8)
    trainer.fit(Squashing(), regression_loader(n=128, batch_size=16))
    scalars = read_scalars(trainer.logger.log_dir)
    assert [s for s, _ in scalars["watch/act_rms/net.0"]] == [3, 7]
    for window, steps in enumerate([(1, 3), (5, 7)]):  # the sampled steps of each window; weights move in between
        for name in names:
            x = reference.window(name, steps)
            got = {metric: scalars[f"watch/{metric}/{name}"][window] for metric in ("act_mean", "act_std", "act_rms")}
            assert got["act_mean"] == (steps[-1], pytest.approx(float(x.mean()), rel=1e-5, abs=1e-6))
            assert got["act_std"][1] == pytest.approx(float(x.std(correction=0)), rel=1e-5)
            assert got["act_rms"][1] == pytest.approx(float(x.square().mean().sqrt()), rel=1e-5)
            assert scalars[f"watch/act_max_abs/{name}"][window][1] == pytest.approx(float(x.abs().max()), rel=1e-6)
            assert scalars[f"watch/act_nonfinite_frac/{name}"][window][1] == 0.0
        for name, (lo, hi) in (("net.1", (-1.0, 1.0)), ("net.3", (0.0, 1.0))):
            expected = _saturated(reference.window(name, steps).float(), lo, hi, margin)
            assert scalars[f"watch/act_saturated_frac/{name}"][window][1] == pytest.approx(expected, abs=1e-12)
            assert 0.0 < expected < 1.0
    assert "watch/act_saturated_frac/net.0" not in scalars  # Linear outputs have no asymptotes


def test_hardtanh_uses_its_own_bounds(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Hardtanh(-0.5, 0.5), nn.Linear(16, 1))
    reference = StoreOutputs(["net.1"])
    monitor = ActivationScaleMonitor(types=["Hardtanh"], log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [reference, monitor], max_steps=1)
    trainer.fit(TinyRegressor(net=net), regression_loader())
    x = reference.window("net.1", [0]).float()
    expected = _saturated(x, -0.5, 0.5, 0.01)
    assert read_scalars(trainer.logger.log_dir)["watch/act_saturated_frac/net.1"][0][1] == pytest.approx(expected)
    assert expected > 0.3  # most of N(0, 1)-ish pre-activations are clipped at ±0.5


def test_nonfinite_fraction_counts_inf_and_nan_entries_and_shows_nan(tmp_path):
    class Poison(nn.Module):
        def forward(self, x):
            x = x.clone()
            x[0, :3] = math.inf
            x[2, 5] = -math.inf
            x[3, :] = math.nan
            return x

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), Poison(), nn.Linear(8, 1))
    monitor = ActivationScaleMonitor(include="net.1", log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=1)
    trainer.fit(TinyRegressor(net=net, lr=0.0), regression_loader(batch_size=16))
    scalars = read_scalars(trainer.logger.log_dir)
    assert scalars["watch/act_nonfinite_frac/net.1"][0][1] == pytest.approx((3 + 1 + 8) / (16 * 8))
    assert math.isnan(scalars["watch/act_mean/net.1"][0][1])  # NaN is shown, not hidden
    assert math.isnan(scalars["watch/act_max_abs/net.1"][0][1])


class Twice(TinyRegressor):
    """One module called twice per forward: both calls belong to its statistics."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(net=nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)))

    def forward(self, x):
        return self.net[2](self.net[1](self.net[0](self.net[1](self.net[0](x)))))


def test_every_call_of_a_module_counts(tmp_path):
    reference = StoreOutputs(["net.0", "net.1"])
    trainer = make_trainer(
        tmp_path, [reference, ActivationScaleMonitor(log_every_n_steps=2, sample_every_n_steps=1)], max_steps=2
    )
    trainer.fit(Twice(), regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    for name in ("net.0", "net.1"):
        x = reference.window(name, [0, 1])
        assert len(reference.outputs[(name, 0)]) == 2
        assert scalars[f"watch/act_rms/{name}"][0][1] == pytest.approx(float(x.square().mean().sqrt()), rel=1e-5)
        assert scalars[f"watch/act_mean/{name}"][0][1] == pytest.approx(float(x.mean()), rel=1e-5, abs=1e-7)
        # both calls' extremes count (a batch's rows join the window one call of each module at a time)
        assert scalars[f"watch/act_max_abs/{name}"][0][1] == pytest.approx(float(x.abs().max()), rel=1e-6)


def test_statistics_of_a_large_mean_output_keep_the_documented_precision(tmp_path):
    """Raw sums of squares: the variance's relative error is about 1e-7 * (mean / std)**2, never negative."""

    class Offset(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, x):
            return x * self.scale + 100.0

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), Offset(1.0), Offset(1e-4), nn.Linear(8, 1))
    reference = StoreOutputs(["net.1", "net.2"])
    monitor = ActivationScaleMonitor(include=["net.1", "net.2"], log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [reference, monitor], max_steps=1)
    trainer.fit(TinyRegressor(net=net, lr=0.0), regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    x = reference.window("net.1", [0])  # mean 100, std about 1: (mean/std)**2 about 1e4
    assert scalars["watch/act_mean/net.1"][0][1] == pytest.approx(float(x.mean()), rel=1e-6)
    assert scalars["watch/act_std/net.1"][0][1] == pytest.approx(float(x.std(correction=0)), rel=5e-3)
    # mean/std about 1e6: the std is not resolvable in float32, but it stays a number >= 0
    std = scalars["watch/act_std/net.2"][0][1]
    assert math.isfinite(std) and std >= 0


def test_activation_scale_matches_reference_over_the_window(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
    with torch.no_grad():
        net[2].weight.mul_(8.0)  # push some sigmoid inputs far out: saturation to count
    model = TinyRegressor(net=net, lr=0.0)  # lr 0: every sampled batch sees the same weights
    ref = StoreOutputs(["net.1", "net.3"])
    monitor = ActivationScaleMonitor(log_every_n_steps=4, sample_every_n_steps=2)
    trainer = make_trainer(tmp_path, [ref, monitor], max_steps=4)
    trainer.fit(model, regression_loader(n=64, batch_size=16))
    scalars = read_scalars(trainer.logger.log_dir)
    for name, bounds in (("net.1", (-1.0, 1.0)), ("net.3", (0.0, 1.0))):
        outs = ref.window(name, (1, 3))  # the steps the monitor samples
        assert [len(ref.outputs[(name, step)]) for step in (1, 3)] == [1, 1]
        assert scalars[f"watch/act_mean/{name}"][0] == (3, pytest.approx(float(outs.mean()), rel=1e-5, abs=1e-7))
        assert scalars[f"watch/act_std/{name}"][0][1] == pytest.approx(float(outs.std(correction=0)), rel=1e-4)
        assert scalars[f"watch/act_rms/{name}"][0][1] == pytest.approx(float(outs.square().mean().sqrt()), rel=1e-5)
        assert scalars[f"watch/act_max_abs/{name}"][0][1] == pytest.approx(float(outs.abs().max()), rel=1e-6)
        lo, hi = bounds
        edge = 0.01 * (hi - lo)
        saturated = float(((outs <= lo + edge) | (outs >= hi - edge)).double().mean())
        assert scalars[f"watch/act_saturated_frac/{name}"][0][1] == pytest.approx(saturated, abs=1e-9)
    assert scalars["watch/act_saturated_frac/net.3"][0][1] > 0
    assert "watch/act_saturated_frac/net.0" not in scalars  # a Linear has no asymptotes


def test_validation_activations_when_asked_equal_a_forward_over_the_validation_set(tmp_path):
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


def test_an_output_on_another_device_than_the_window_is_refused_naming_both():
    from lightning_watch.capture import CapturedOutput, ModuleInfo
    from lightning_watch.monitors.activation_scale import _BatchRows
    from lightning_watch.stats import StateRegistry

    state = StateRegistry()
    state.declare("sums", (1, 4), reduce="sum")
    state.declare("high", (1,), reduce="max")
    state.declare("low", (1,), reduce="min")
    state.declare("counts", (1,), reduce="sum", host=True)
    state.allocate(torch.device("cpu"))
    info = ModuleInfo("fc", nn.Identity(), None, None)
    rows = _BatchRows()
    # inside the forward hook this error skips that module with a warning (the capture engine's rule)
    with pytest.raises(ValueError, match="output is on meta, the statistics of the window on cpu"):
        rows.add(state, 0, CapturedOutput(info, torch.zeros(3, device="meta"), 0.01))
    rows.add(state, 0, CapturedOutput(info, torch.tensor([1.0, -3.0]), 0.01))
    rows.flush(state)
    assert state["sums"].tolist() == [[-2.0, 10.0, 0.0, 0.0]] and state["counts"] == [2]
    assert (state["high"].item(), state["low"].item()) == (1.0, -3.0)
