"""Module selection: defaults per monitor, globs, types by class and by name, exclude, and bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyRegressor, make_trainer, regression_loader
from torch import nn

from lightning_watch import ActivationScaleMonitor, DeadUnitMonitor, GradientNormMonitor, ParameterDeltaMonitor, Watch
from lightning_watch.selection import ModuleSelection, owns_parameters, resolve_type


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return self.gate(self.fc2(self.act(self.fc1(x))))


class Model(nn.Module):
    """Nested names: encoder.fc1, encoder.act, encoder.fc2, encoder.gate, drop, head."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(8, 1)


def _names(selection: ModuleSelection, default=owns_parameters) -> list[str]:
    return [name for name, _ in selection.resolve(Model(), default=default)]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["encoder.fc1", "encoder.fc2", "head"]),  # the default predicate: parameter owners
        ({"include": "encoder.*"}, ["encoder.fc1", "encoder.act", "encoder.fc2", "encoder.gate"]),
        ({"include": ["*.fc?", "head"]}, ["encoder.fc1", "encoder.fc2", "head"]),
        ({"include": "encoder"}, ["encoder"]),  # a glob matches whole names, not prefixes
        ({"types": [nn.Linear]}, ["encoder.fc1", "encoder.fc2", "head"]),
        ({"types": "Linear"}, ["encoder.fc1", "encoder.fc2", "head"]),
        ({"types": ["torch.nn.Linear"]}, ["encoder.fc1", "encoder.fc2", "head"]),
        ({"types": ["ReLU", nn.Sigmoid]}, ["encoder.act", "encoder.gate"]),
        # include and types combine by union, in registration order, each module once
        ({"include": "head", "types": ["ReLU", "Linear"]}, ["encoder.fc1", "encoder.act", "encoder.fc2", "head"]),
        ({"exclude": "encoder.*"}, ["head"]),  # exclude applies to the default selection too
        ({"types": "Linear", "exclude": ["head", "*fc1"]}, ["encoder.fc2"]),
    ],
)
def test_resolve(kwargs, expected):
    assert _names(ModuleSelection.from_args(**kwargs)) == expected


def test_resolve_type_names():
    assert resolve_type("Linear") is nn.Linear
    assert resolve_type("torch.nn.Conv2d") is nn.Conv2d
    assert resolve_type("helpers.TinyRegressor") is TinyRegressor  # a user's own class by dotted path
    assert resolve_type(nn.GRU) is nn.GRU


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"types": ["Lienar"]}, r"`types` entry 'Lienar' is not a class in torch.nn"),
        ({"types": ["torch.nn.Lienar"]}, r"`types` entry 'torch.nn.Lienar' could not be imported"),
        ({"types": ["math.pi"]}, r"`types` entry 'math.pi' must be a subclass of torch.nn.Module, got 3.14"),
        ({"types": [int]}, r"`types` entry <class 'int'> must be a subclass of torch.nn.Module"),
        ({"types": [""]}, r"`types` entries must be module classes or their names, got ''"),
        ({"types": 3}, r"`types` must be a module class, its name, or a list of them, got 3\."),
        ({"include": 3}, r"`include` must be a glob string or a list of them, got 3\."),
        ({"include": ["fc", 3]}, r"`include` must be a glob string or a list of them, got 3 in \['fc', 3\]"),
        ({"exclude": [""]}, r"`exclude` must be a glob string or a list of them, got ''"),
    ],
)
def test_bad_selection_arguments_fail_at_construction_of_every_monitor(kwargs, message):
    for cls in (GradientNormMonitor, ParameterDeltaMonitor, ActivationScaleMonitor, DeadUnitMonitor, Watch):
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": "encoder.*"}, r"`include` pattern 'encoder\.\*' matches no module of TinyRegressor\. "),
        ({"exclude": "net.9"}, r"`exclude` pattern 'net\.9' matches no module of TinyRegressor\. "),
        ({"types": ["Conv2d"]}, r"`types` entry 'Conv2d' matches no module of TinyRegressor\. Types present: "),
    ],
)
def test_a_selection_matching_nothing_fails_at_fit_start_naming_it(tmp_path, kwargs, message):
    monitor = Watch(**kwargs)  # construction knows no model: it must not fail yet
    trainer = make_trainer(tmp_path, [monitor], max_steps=1)
    with pytest.raises(ValueError, match=message) as info:
        trainer.fit(TinyRegressor(), regression_loader())
    # the message names what would have been valid
    assert "'net.0'" in str(info.value) or "Linear" in str(info.value)
    assert all(not m._forward_hooks for m in trainer.lightning_module.modules())


def test_default_selection_of_each_monitor(tmp_path):
    class Net(TinyRegressor):
        def __init__(self):
            net = nn.Sequential(
                nn.Linear(4, 6),  # 0
                nn.ReLU(),  # 1
                nn.Linear(6, 6),  # 2
                nn.Tanh(),  # 3
                nn.Dropout(0.0),  # 4
                nn.LayerNorm(6),  # 5
                nn.ReLU6(),  # 6
                nn.Linear(6, 1),  # 7
            )
            super().__init__(net=net)
            self.frozen = nn.Linear(2, 2).requires_grad_(False)  # registered, never called

    monitors = [GradientNormMonitor(), ParameterDeltaMonitor(), ActivationScaleMonitor(), DeadUnitMonitor()]
    make_trainer(tmp_path, monitors, max_steps=1).fit(Net(), regression_loader())
    owners = ["net.0", "net.2", "net.5", "net.7", "frozen"]
    assert monitors[0].module_names == owners
    assert monitors[1].module_names == owners
    assert monitors[2].module_names == ["net.0", "net.1", "net.2", "net.3", "net.5", "net.6", "net.7", "frozen"]
    # rectifiers by output, Linear/Conv by gradient; LayerNorm and Tanh cannot have dead units
    assert monitors[3].module_names == ["net.0", "net.1", "net.2", "net.6", "net.7", "frozen"]


def test_watch_passes_one_selection_to_every_monitor(tmp_path):
    torch.manual_seed(0)
    watch = Watch(include="net.*", exclude="net.2")
    make_trainer(tmp_path, [watch], max_steps=1).fit(TinyRegressor(), regression_loader())
    for monitor in watch.monitors:
        assert monitor.module_names == ["net.0", "net.1"], type(monitor).__name__


def test_a_standalone_monitor_pattern_matching_nothing_fails_at_fit_start_naming_a_valid_module(tmp_path):
    trainer = make_trainer(tmp_path, [GradientNormMonitor(include="encoder.*")], max_steps=1)
    with pytest.raises(ValueError, match=r"`include` pattern 'encoder.\*' matches no module .*'net.0'"):
        trainer.fit(TinyRegressor(), regression_loader())


def test_selection_by_glob_type_name_and_exclude(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    by_type = ActivationScaleMonitor(types=["torch.nn.Tanh", nn.ReLU])
    by_glob = GradientNormMonitor(include="net.*", exclude="net.4")
    make_trainer(tmp_path, [by_type, by_glob], max_steps=1).fit(TinyRegressor(net=net), regression_loader())
    assert by_type.module_names == ["net.1", "net.3"]
    assert by_glob.module_names == ["net.0", "net.1", "net.2", "net.3"]
