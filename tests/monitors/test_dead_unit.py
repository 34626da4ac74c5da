"""DeadUnitMonitor: exact dead fractions for rectifier modules, functional ReLUs, convs and sequences."""

from __future__ import annotations

import pytest
import torch
from helpers import StoreOutputs, TinyRegressor, make_trainer, read_scalars, regression_loader
from lightning.pytorch import Callback
from torch import nn

from lightning_watch import DeadUnitMonitor


def dead_fracs(scalars, name):
    return [v for _, v in scalars[f"watch/dead_frac/{name}"]]


def test_rectifier_module_fraction_is_exact_over_the_sampled_window(tmp_path):
    """Graded biases: some units fire on only some batches; a unit alive once in the window is alive."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(16, 4) * 0.5)
        net[0].bias.copy_(-torch.linspace(0.0, 6.0, 16))  # from always firing to practically never
    reference = StoreOutputs("net.1")
    monitor = DeadUnitMonitor(log_every_n_steps=4, sample_every_n_steps=2)
    trainer = make_trainer(tmp_path, [reference, monitor], max_steps=8)
    trainer.fit(TinyRegressor(net=net, lr=0.0), regression_loader(n=32, batch_size=4))
    scalars = read_scalars(trainer.logger.log_dir)
    windows = ((1, 3), (5, 7))  # the sampled steps of each window
    expected = [reference.dead_fraction("net.1", steps, 1) for steps in windows]
    assert dead_fracs(scalars, "net.1") == pytest.approx(expected, abs=1e-12)
    assert [s for s, _ in scalars["watch/dead_frac/net.1"]] == [3, 7]
    assert all(0 < e < 1 for e in expected)
    # the window matters: judged on one batch alone, more units would look dead
    assert any(reference.dead_fraction("net.1", (s,), 1) > e for steps, e in zip(windows, expected) for s in steps)


class Functional(TinyRegressor):
    """No activation module: the rectifier is spelled inside forward."""

    def __init__(self, net, spelling):
        super().__init__(net=net, lr=0.01)
        self.spelling = spelling

    def forward(self, x):
        h = self.net[0](x)
        h = {"relu": torch.relu, "F.relu": nn.functional.relu, "clamp": lambda t: t.clamp(min=0)}[self.spelling](h)
        return self.net[2](h)


def _dead_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].bias[[1, 4, 6]] = -100.0  # these three units can never fire on N(0, 1) inputs
    return net


@pytest.mark.parametrize("spelling", ["module", "F.relu", "relu", "clamp"])
def test_dead_fraction_whatever_the_activation_spelling(tmp_path, spelling):
    net = _dead_net()
    model = TinyRegressor(net=net, lr=0.01) if spelling == "module" else Functional(net, spelling)
    trainer = make_trainer(tmp_path, [DeadUnitMonitor(log_every_n_steps=2)], max_steps=4)
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    # the gradient criterion on the Linear before the activation sees the same 3 of 8
    assert dead_fracs(scalars, "net.0") == [3 / 8, 3 / 8]
    if spelling == "module":
        assert dead_fracs(scalars, "net.1") == [3 / 8, 3 / 8]
    else:
        assert "watch/dead_frac/net.1" not in scalars  # the ReLU module exists but never runs
    assert dead_fracs(scalars, "net.2") == [0.0, 0.0]


class ConvNet(TinyRegressor):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(
            net=nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 1))
        )
        with torch.no_grad():
            self.net[0].bias[[0, 3]] = -1e4  # dead everywhere
            self.net[0].weight[5] = 0.0
            self.net[0].bias[5] = 0.0  # output exactly 0 at every position: never > 0, dead too

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 4, 4))


def test_conv_channels_are_counted_per_channel(tmp_path):
    reference = StoreOutputs("net.1")
    trainer = make_trainer(tmp_path, [reference, DeadUnitMonitor(log_every_n_steps=2)], max_steps=2)
    trainer.fit(ConvNet(), regression_loader(in_features=16))
    scalars = read_scalars(trainer.logger.log_dir)
    assert reference.dead_fraction("net.1", (0, 1), 1) == pytest.approx(3 / 6)
    assert dead_fracs(scalars, "net.1") == pytest.approx([3 / 6])  # channels, not 16 positions
    assert dead_fracs(scalars, "net.0") == pytest.approx([3 / 6])  # gradient rows of the conv weight


class Sequences(TinyRegressor):
    """ReLU after Conv1d (N, C, L) and after Linear on (N, L, F); ``act`` is registered before its layer."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(net=nn.Linear(1, 1))
        self.act = nn.ReLU()  # reused after the conv: its layout comes from the conv
        self.conv = nn.Conv1d(2, 6, 3)  # (N, 2, 7) -> (N, 6, 5)
        self.fc = nn.Linear(2, 5)  # (N, 4, 2) -> (N, 4, 5)
        self.fc_act = nn.ReLU()
        self.head = nn.Linear(6 * 5 + 4 * 5, 1)
        with torch.no_grad():
            self.conv.bias[[2]] = -1e4  # 1 of 6 channels dead
            self.fc.bias[[0, 3]] = -1e4  # 2 of 5 features dead

    def forward(self, x):
        a = self.act(self.conv(x[:, :14].reshape(-1, 2, 7)))
        b = self.fc_act(self.fc(x[:, 14:22].reshape(-1, 4, 2)))
        return self.head(torch.cat([a.flatten(1), b.flatten(1)], dim=1))


def test_unit_dimension_follows_the_producing_layer(tmp_path):
    monitor = DeadUnitMonitor(include=["act", "fc_act", "conv", "fc"], log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    trainer.fit(Sequences(), regression_loader(in_features=22))
    scalars = read_scalars(trainer.logger.log_dir)
    assert dead_fracs(scalars, "act") == pytest.approx([1 / 6, 1 / 6])  # channels (dim 1), not 5 positions
    assert dead_fracs(scalars, "fc_act") == pytest.approx([2 / 5, 2 / 5])  # features (last dim), not 4 steps
    assert dead_fracs(scalars, "conv") == pytest.approx([1 / 6, 1 / 6])
    assert dead_fracs(scalars, "fc") == pytest.approx([2 / 5, 2 / 5])


def test_each_window_is_judged_on_its_own(tmp_path):
    """Units dead in the first window and revived before the second are alive in the second."""
    net = _dead_net()

    class Revive(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                with torch.no_grad():
                    pl_module.net[0].bias[[1, 4, 6]] = 1.0

    trainer = make_trainer(tmp_path, [Revive(), DeadUnitMonitor(log_every_n_steps=2)], max_steps=4)
    trainer.fit(TinyRegressor(net=net, lr=0.0), regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert dead_fracs(scalars, "net.1") == [3 / 8, 0.0]
    assert dead_fracs(scalars, "net.0") == [3 / 8, 0.0]


def test_relu6_units_die_too(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU6(), nn.Linear(4, 1))
    with torch.no_grad():
        net[0].bias[0] = -50.0
    trainer = make_trainer(tmp_path, [DeadUnitMonitor(log_every_n_steps=1)], max_steps=1)
    trainer.fit(TinyRegressor(net=net), regression_loader())
    assert dead_fracs(read_scalars(trainer.logger.log_dir), "net.1") == [0.25]


def test_dead_conv_channels_at_every_logging_step_behind_a_lazy_head(tmp_path):
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
