"""The alert zoo: tiny sick runs each raise their code early; healthy runs raise nothing above info.

Every run uses the Trainer's default ``log_every_n_steps=50`` and ``Watch()`` with its default
alerts, on synthetic data, for at most a few hundred steps.
"""

from __future__ import annotations

import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet, quiet_fit
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_watch import Watch

#: sick runs must raise their code within this many steps ("early")
EARLY = 300


# ---------------------------------------------------------------------- data
def classification(n=4096, features=16, classes=4, seed=0, sort=False, image=False, seq=False):
    g = torch.Generator().manual_seed(seed)
    if image:
        x = torch.randn(n, 1, 8, 8, generator=g)
        y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, :, :4].mean(dim=(1, 2, 3)) > 0).long()
    elif seq:
        x = torch.randn(n, 6, features, generator=g)
        y = (x.sum(dim=1) @ torch.randn(features, classes, generator=g)).argmax(1)
    else:
        x = torch.randn(n, features, generator=g)
        y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    if sort:
        order = y.argsort()
        x, y = x[order], y[order]
    return TensorDataset(x, y)


def regression(n=4096, features=16, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = x @ torch.randn(features, 1, generator=g) + noise * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(dataset, batch_size=16, shuffle=True):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


# ---------------------------------------------------------------------- modules
class Task(pl.LightningModule):
    """``net`` trained with cross-entropy (or MSE) by one optimizer over ``params`` (all by default)."""

    def __init__(self, net, lr=1e-3, opt="adam", loss="ce", params=None, lr_growth=None):
        super().__init__()
        self.net, self.lr, self.opt, self.loss_name = net, lr, opt, loss
        self._params = params
        self.lr_growth = lr_growth

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return nn.functional.cross_entropy(out, y) if self.loss_name == "ce" else nn.functional.mse_loss(out, y)

    def configure_optimizers(self):
        params = self._params(self) if self._params else self.parameters()
        cls = torch.optim.Adam if self.opt == "adam" else torch.optim.SGD
        optimizer = cls(params, lr=self.lr)
        if self.lr_growth is None:
            return optimizer
        # a learning rate that keeps growing: training improves, then crosses stability and diverges
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_growth**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ManualNoStep(Task):
    """Manual optimization that forgets ``opt.step()``."""

    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        return loss  # opt.step() forgotten


class SeqClassifier(nn.Module):
    def __init__(self, batch_first=True, features=16, hidden=16, classes=4):
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, batch_first=batch_first)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):  # x: (B, T, F) in every case; the sick model declares batch_first=False
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    def __init__(self, features=16, classes=4):
        super().__init__()
        layer = nn.TransformerEncoderLayer(features, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(features, classes)

    def forward(self, x):  # (B, T, F)
        return self.head(self.encoder(x).mean(dim=1))


def mlp(widths, act=nn.ReLU):
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def cnn_bn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


# ---------------------------------------------------------------------- runner
def fit(tmp_path, module, data, max_steps=EARLY, seed=0, **trainer_kw):
    """Train with Trainer defaults (``log_every_n_steps=50``) and a default ``Watch()``; return the alerts."""
    if seed is not None:
        pl.seed_everything(seed, verbose=False)
    watch = Watch()
    kw = dict(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    kw.update(trainer_kw)
    # deep sigmoid stacks produce denormal floats, which make CPU arithmetic 50x slower
    flush = torch.set_flush_denormal(True)
    # tiny models: one thread avoids OpenMP spin-waits when other processes share the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = quiet(pl.Trainer, callbacks=[watch], **kw)
        quiet_fit(trainer, module, data)
    finally:
        torch.set_num_threads(threads)
        if flush:
            torch.set_flush_denormal(False)
    return watch.alerts


def codes(alerts, min_severity="warning"):
    rank = {"info": 0, "warning": 1, "error": 2}
    return {a.code for a in alerts if rank[a.severity] >= rank[min_severity]}


def first_step(alerts, code):
    return min(a.step for a in alerts if a.code == code)


def seeded_module(build, *args, **kwargs):
    torch.manual_seed(0)
    return build(*args, **kwargs)


# ---------------------------------------------------------------------- healthy runs
HEALTHY = {
    "mlp": lambda: (Task(mlp([16, 32, 32, 4])), classification()),
    "cnn_batchnorm": lambda: (Task(cnn_bn(), lr=3e-3), classification(n=2048, image=True)),
    "lstm": lambda: (Task(SeqClassifier(batch_first=True), lr=3e-3), classification(n=2048, seq=True)),
    "transformer": lambda: (Task(TinyTransformer(), lr=1e-3), classification(n=2048, seq=True)),
    "sigmoid_mlp": lambda: (Task(mlp([16, 32, 32, 4], nn.Sigmoid), lr=3e-3), classification()),
    "sgd_regression": lambda: (Task(mlp([16, 32, 1]), lr=0.01, opt="sgd", loss="mse"), regression()),
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_runs_raise_nothing_above_info(tmp_path, name):
    torch.manual_seed(0)
    module, dataset = HEALTHY[name]()
    alerts = fit(tmp_path, module, loader(dataset, batch_size=16 if name != "cnn_batchnorm" else 32))
    assert codes(alerts) == set(), [a.summary() for a in alerts]


# ---------------------------------------------------------------------- sick runs
def _scaled(net, factor):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(factor)
    return net


def _dead(net):
    with torch.no_grad():
        for m in list(net.modules())[1:-1]:
            if isinstance(m, nn.Linear):
                m.bias.fill_(-10.0)
    return net


def _sorted_iterable(dataset, batch_size=16):
    class Sorted(IterableDataset):
        def __iter__(self):
            x, y = dataset.tensors
            return iter(zip(x, y))

    return DataLoader(Sorted(), batch_size=batch_size)


SICK = {
    # name: (build -> (module, loader, trainer kwargs), expected codes, max steps)
    "nan_loss_huge_lr": (
        lambda: (Task(mlp([16, 32, 4]), lr=1e8, opt="sgd"), loader(classification()), {}),
        {"non_finite_loss", "non_finite_gradients"},
        120,
    ),
    "exploding_gradients": (
        lambda: (
            Task(_scaled(mlp([16] * 8 + [1], nn.Identity), 4.0), lr=1e-12, opt="sgd", loss="mse"),
            loader(regression()),
            {},
        ),
        {"exploding_gradients"},
        120,
    ),
    "vanishing_gradients_deep_sigmoid": (
        lambda: (Task(mlp([16] + [32] * 10 + [4], nn.Sigmoid), lr=0.1, opt="sgd"), loader(classification()), {}),
        {"vanishing_gradients"},
        EARLY,
    ),
    "dead_relus_negative_bias": (
        lambda: (Task(_dead(mlp([16, 32, 32, 4]))), loader(classification()), {}),
        {"dead_units"},
        150,
    ),
    "saturated_sigmoids_huge_preactivations": (
        lambda: (Task(_scaled(mlp([16, 32, 32, 4], nn.Sigmoid), 400.0)), loader(classification()), {}),
        {"saturated_units", "activation_explosion"},
        150,
    ),
    "stalled_layer_missing_from_optimizer": (
        lambda: (Task(mlp([16, 32, 4]), params=lambda m: m.net[2].parameters()), loader(classification()), {}),
        {"stalled_parameters"},
        150,
    ),
    "stalled_manual_optimization_without_step": (
        # global_step never advances without opt.step(): bound the run by batches instead
        lambda: (
            ManualNoStep(mlp([16, 32, 4])),
            loader(classification()),
            {"max_steps": -1, "max_epochs": 1, "limit_train_batches": 150},
        ),
        {"stalled_parameters"},
        150,
    ),
    "large_updates": (
        lambda: (Task(mlp([16, 32, 4]), lr=3.0, opt="sgd"), loader(classification()), {}),
        {"large_updates"},
        EARLY,
    ),
    "tiny_updates_and_plateau": (
        lambda: (Task(mlp([16, 32, 4]), lr=1e-7, opt="sgd"), loader(classification(), batch_size=64), {}),
        {"tiny_updates", "loss_plateau"},
        EARLY,
    ),
    "loss_divergence": (
        lambda: (
            Task(mlp([16, 1]), lr=0.3, opt="sgd", loss="mse", lr_growth=1.01),
            loader(regression(), batch_size=256),
            {},
        ),
        {"loss_divergence"},
        EARLY,
    ),
    "unshuffled_sorted_labels": (
        lambda: (Task(mlp([16, 32, 4])), loader(classification(sort=True), shuffle=False), {}),
        {"unshuffled_data"},
        60,
    ),
    "unshuffled_sorted_iterable": (
        lambda: (Task(mlp([16, 32, 4])), _sorted_iterable(classification(sort=True)), {}),
        {"unshuffled_data"},
        60,
    ),
    "lstm_batch_first_false": (
        lambda: (Task(SeqClassifier(batch_first=False), lr=3e-3), loader(classification(n=512, seq=True)), {}),
        {"batch_mixing"},
        5,
    ),
    "batch_norm_batch_of_two": (
        lambda: (Task(cnn_bn()), loader(classification(n=256, image=True), batch_size=2), {}),
        {"small_batch_norm"},
        5,
    ),
}


@pytest.mark.parametrize("name", sorted(SICK))
def test_sick_runs_raise_their_code_early(tmp_path, name):
    build, expected, steps = SICK[name]
    torch.manual_seed(0)
    module, data, kw = build()
    kw.setdefault("max_steps", steps)
    alerts = fit(tmp_path, module, data, **kw)
    found = codes(alerts)
    assert expected <= found, [a.summary() for a in alerts]
    for code in expected:
        assert first_step(alerts, code) < steps
        alert = next(a for a in alerts if a.code == code)
        assert alert.hint and alert.message and alert.severity in ("warning", "error")
    # where the symptom is one layer's, the alert names that layer
    where = {
        "stalled_layer_missing_from_optimizer": ("stalled_parameters", "net.0"),
        "stalled_manual_optimization_without_step": ("stalled_parameters", None),
        "vanishing_gradients_deep_sigmoid": ("vanishing_gradients", "net.0"),
        "nan_loss_huge_lr": ("non_finite_gradients", "net.0"),
    }
    if name in where:
        code, module = where[name]
        assert {a.module for a in alerts if a.code == code} == {module}
    # the healthy-looking symptoms of each pathology do not include the unrelated static checks
    assert not ({"unshuffled_data", "batch_mixing", "small_batch_norm"} - expected) & found


def test_unseeded_run_is_info(tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    torch.seed()  # a fresh non-deterministic seed, as in a process nobody seeded
    alerts = fit(tmp_path, Task(mlp([16, 8, 4])), loader(classification(n=256)), max_steps=5, seed=None)
    unseeded = [a for a in alerts if a.code == "unseeded_run"]
    assert [a.severity for a in unseeded] == ["info"]
    assert "seed_everything" in unseeded[0].hint
    pl.seed_everything(0, verbose=False)
    alerts = fit(tmp_path, Task(mlp([16, 8, 4])), loader(classification(n=256)), max_steps=5)
    assert "unseeded_run" not in {a.code for a in alerts}
    assert not math.isnan(0.0)
