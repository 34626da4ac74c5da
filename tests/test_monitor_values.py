"""Logged values against independent plain-PyTorch computations, read back with TensorBoard's reader."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TinyRegressor, make_trainer, read_scalars, regression_loader
from lightning.pytorch import Callback
from torch import nn

from lightning_watch import ActivationScaleMonitor, DeadUnitMonitor, GradientNormMonitor, ParameterDeltaMonitor, Watch


class RecordGrads(Callback):
    """Reference: copies of every gradient right before the optimizer step (pre-clip) and after it."""

    def __init__(self):
        self.pre, self.post, self.before, self.after = [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.post.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def _norm(tensors):
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def test_gradient_norms_match_reference_pre_and_post_clip(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor(lr=0.05)
    ref = RecordGrads()
    trainer = make_trainer(tmp_path, [ref, GradientNormMonitor(log_every_n_steps=2)], gradient_clip_val=0.05)
    trainer.fit(model, regression_loader(n=64, batch_size=16))
    scalars = read_scalars(trainer.logger.log_dir)
    logged = dict(scalars["watch/grad_norm/net.0"])
    assert sorted(logged) == [1, 3]
    for step in (1, 3):
        grads = ref.pre[step]
        assert logged[step] == pytest.approx(_norm([grads["net.0.weight"], grads["net.0.bias"]]), rel=1e-5)
        assert dict(scalars["watch/global/grad_norm"])[step] == pytest.approx(_norm(grads.values()), rel=1e-5)
        clipped = dict(scalars["watch/global/grad_norm_clipped"])[step]
        assert clipped == pytest.approx(_norm(ref.post[step].values()), rel=1e-5)
        assert clipped <= 0.05 * (1 + 1e-4) < dict(scalars["watch/global/grad_norm"])[step]
    assert all(v == 0 for _, v in scalars["watch/global/grad_nonfinite"])


def test_nonfinite_gradients_are_counted_not_hidden(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor()
    # two gradient entries of the first weight become NaN and one +Inf
    poison = torch.zeros_like(model.net[0].weight)
    poison[0, 0], poison[1, 1], poison[2, 2] = math.nan, math.nan, math.inf
    model.net[0].weight.register_hook(lambda g: g + poison)
    trainer = make_trainer(tmp_path, [GradientNormMonitor(log_every_n_steps=1)], max_steps=1)
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert scalars["watch/grad_nonfinite/net.0"][0][1] == 3
    assert scalars["watch/grad_nonfinite/net.2"][0][1] == 0
    assert scalars["watch/global/grad_nonfinite"][0][1] == 3
    assert math.isnan(scalars["watch/grad_norm/net.0"][0][1])


def test_per_parameter_norms(tmp_path):
    torch.manual_seed(0)
    ref = RecordGrads()
    trainer = make_trainer(tmp_path, [ref, GradientNormMonitor(per_parameter=True, log_every_n_steps=1)], max_steps=1)
    trainer.fit(TinyRegressor(), regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    for name in ("net.0.weight", "net.2.bias"):
        assert scalars[f"watch/grad_norm/{name}"][0][1] == pytest.approx(float(ref.pre[0][name].norm()), rel=1e-5)


def test_sgd_update_is_lr_times_gradient(tmp_path):
    torch.manual_seed(0)
    lr = 0.05
    ref = RecordGrads()
    trainer = make_trainer(tmp_path, [ref, ParameterDeltaMonitor(log_every_n_steps=2)], max_steps=4)
    trainer.fit(TinyRegressor(lr=lr), regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    for step in (1, 3):
        g = ref.pre[step]
        update = dict(scalars["watch/update_norm/net.2"])[step]
        assert update == pytest.approx(lr * _norm([g["net.2.weight"], g["net.2.bias"]]), rel=1e-4)
        before = _norm([ref.before[step]["net.2.weight"], ref.before[step]["net.2.bias"]])
        assert dict(scalars["watch/param_norm/net.2"])[step] == pytest.approx(before, rel=1e-5)
        assert dict(scalars["watch/update_ratio/net.2"])[step] == pytest.approx(update / before, rel=1e-5)
    assert all(v == 1 for _, v in scalars["watch/global/optimizer_steps"])


class PartlyOptimized(TinyRegressor):
    """net.2 requires grad but is left out of the optimizer: it never moves."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.net[0].parameters(), lr=0.1)


def test_parameter_outside_the_optimizer_shows_zero_update_and_frozen_is_not_reported(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Linear(1, 1))
    model = PartlyOptimized(net=net)
    model.net[3].requires_grad_(False)
    monitor = ParameterDeltaMonitor(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert all(v == 0 for _, v in scalars["watch/update_norm/net.2"])
    assert all(v > 0 for _, v in scalars["watch/update_norm/net.0"])
    assert "watch/update_norm/net.3" not in scalars
    assert monitor._before is None  # no copy of the weights survives the logging step


def test_accumulation_measures_one_optimizer_step_at_lightning_steps(tmp_path):
    torch.manual_seed(0)
    lr = 0.1
    ref = RecordGrads()
    monitors = [ref, ParameterDeltaMonitor(log_every_n_steps=1), GradientNormMonitor(log_every_n_steps=1)]
    trainer = make_trainer(tmp_path, monitors, accumulate_grad_batches=2)
    trainer.fit(TinyRegressor(lr=lr), regression_loader(n=64, batch_size=16))  # 4 batches -> 2 optimizer steps
    scalars = read_scalars(trainer.logger.log_dir)
    assert [s for s, _ in scalars["watch/update_norm/net.0"]] == [0, 1]
    assert len(ref.pre) == 2
    for step in (0, 1):
        g = ref.pre[step]
        expected = lr * _norm([g["net.0.weight"], g["net.0.bias"]])
        assert dict(scalars["watch/update_norm/net.0"])[step] == pytest.approx(expected, rel=1e-4)
        assert dict(scalars["watch/grad_norm/net.0"])[step] == pytest.approx(expected / lr, rel=1e-5)


class StoreOutputs(Callback):
    """Reference: every output of the chosen modules on the batches the monitor samples."""

    def __init__(self, modules, sample_every):
        self.modules, self.every, self.outputs, self.handles = modules, sample_every, {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if (step + 1) % self.every == 0:
            for name, module in self.modules:
                hook = module.register_forward_hook(
                    lambda m, i, o, name=name: self.outputs.setdefault(name, []).append(o.detach().clone())
                )
                self.handles.append(hook)

    def on_train_batch_end(self, *args):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def test_activation_scale_matches_reference_over_the_window(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
    with torch.no_grad():
        net[2].weight.mul_(8.0)  # push some sigmoid inputs far out: saturation to count
    model = TinyRegressor(net=net, lr=0.0)  # lr 0: every sampled batch sees the same weights
    ref = StoreOutputs([("net.1", net[1]), ("net.3", net[3])], sample_every=2)
    monitor = ActivationScaleMonitor(log_every_n_steps=4, sample_every_n_steps=2)
    trainer = make_trainer(tmp_path, [ref, monitor], max_steps=4)
    trainer.fit(model, regression_loader(n=64, batch_size=16))
    scalars = read_scalars(trainer.logger.log_dir)
    for name, bounds in (("net.1", (-1.0, 1.0)), ("net.3", (0.0, 1.0))):
        outs = torch.cat([o.reshape(-1) for o in ref.outputs[name]]).double()
        assert len(ref.outputs[name]) == 2  # steps 1 and 3 were sampled
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


def test_nonfinite_activations_fraction(tmp_path):
    class Poison(nn.Module):
        def forward(self, x):
            x = x.clone()
            x[0, 0] = math.inf
            x[1, :] = math.nan
            return x

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), Poison(), nn.ReLU(), nn.Linear(8, 1))
    monitor = ActivationScaleMonitor(types=[Poison], log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=1)
    trainer.fit(TinyRegressor(net=net, lr=0.0), regression_loader(batch_size=16))
    scalars = read_scalars(trainer.logger.log_dir)
    assert scalars["watch/act_nonfinite_frac/net.1"][0][1] == pytest.approx(9 / (16 * 8))
    assert math.isnan(scalars["watch/act_mean/net.1"][0][1])


class FunctionalReLU(TinyRegressor):
    """The same MLP with F.relu written inside forward: no activation module to hook."""

    def forward(self, x):
        return self.net[2](torch.relu(self.net[0](x)))


def _dead_model(functional: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].bias[:3] = -100.0  # units 0, 1, 2 can never fire on N(0, 1) inputs
    return (FunctionalReLU if functional else TinyRegressor)(net=net, lr=0.01)


@pytest.mark.parametrize("functional", [False, True])
def test_dead_units_whatever_the_activation_spelling(tmp_path, functional):
    monitor = DeadUnitMonitor(log_every_n_steps=2)
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    trainer.fit(_dead_model(functional), regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    # gradient criterion on the Linear before the activation: 3 of 8 units get exactly zero gradient
    assert [v for _, v in scalars["watch/dead_frac/net.0"]] == [3 / 8, 3 / 8]
    if functional:
        assert "watch/dead_frac/net.1" not in scalars  # the module exists but is never called
    else:
        assert [v for _, v in scalars["watch/dead_frac/net.1"]] == [3 / 8, 3 / 8]
    assert [v for _, v in scalars["watch/dead_frac/net.2"]] == [0.0, 0.0]


def test_dead_channels_of_a_conv_net(tmp_path):
    class ConvNet(TinyRegressor):
        def __init__(self):
            super().__init__(net=nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(1)), lr=0.01)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x.reshape(-1, 2, 2, 2).repeat(1, 1, 2, 2)), y)

    torch.manual_seed(0)
    model = ConvNet()
    model.net(torch.zeros(1, 2, 4, 4))  # materialize the lazy layer
    with torch.no_grad():
        model.net[0].bias[[1, 4]] = -1e4  # channels 1 and 4 dead everywhere
    trainer = make_trainer(tmp_path, [DeadUnitMonitor(log_every_n_steps=1)], max_steps=2)
    trainer.fit(model, regression_loader(in_features=8))
    scalars = read_scalars(trainer.logger.log_dir)
    assert [v for _, v in scalars["watch/dead_frac/net.1"]] == pytest.approx([2 / 6, 2 / 6])
    assert [v for _, v in scalars["watch/dead_frac/net.0"]] == pytest.approx([2 / 6, 2 / 6])


def test_watch_equals_the_monitors_alone(tmp_path):
    """Watch shares hooks and one read, but must log exactly what each monitor logs alone."""
    torch.manual_seed(0)
    model = TinyRegressor()
    every = {"log_every_n_steps": 2, "sample_every_n_steps": 1}
    alone = [
        GradientNormMonitor(**every),
        ParameterDeltaMonitor(**every),
        ActivationScaleMonitor(**every),
        DeadUnitMonitor(**every),
    ]
    model_b = copy.deepcopy(model)
    ta = make_trainer(tmp_path / "a", alone, max_steps=4, log_every_n_steps=2)
    ta.fit(model, regression_loader())
    tb = make_trainer(tmp_path / "b", [Watch(alerts=False, **every)], max_steps=4, log_every_n_steps=2)
    tb.fit(model_b, regression_loader())
    a, b = read_scalars(ta.logger.log_dir), read_scalars(tb.logger.log_dir)
    watch_tags = {t for t in a if t.startswith("watch/")}
    assert watch_tags == {t for t in b if t.startswith("watch/")}
    for tag in watch_tags:
        assert a[tag] == b[tag], tag
