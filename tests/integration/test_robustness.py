"""The capture engine and the monitors never break training: odd modules, teardown, numerics, bad input."""

from __future__ import annotations

import copy
import importlib
import inspect
import pickle
import warnings

import pytest
import torch
from helpers import CountHooks, TinyRegressor, hook_count, make_trainer, read_scalars, regression_loader
from lightning.pytorch import Callback
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_watch import (
    ActivationScaleMonitor,
    DeadUnitMonitor,
    EarlyAlerts,
    GradientNormMonitor,
    ParameterDeltaMonitor,
    Watch,
    WatchWarning,
)
from lightning_watch.capture import CaptureEngine


def test_two_monitors_share_one_hook_per_module_and_only_on_sampled_steps(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor()
    counter = CountHooks()
    monitors = [ActivationScaleMonitor(sample_every_n_steps=2), DeadUnitMonitor(sample_every_n_steps=2)]
    engines = []

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):
            engines.append(CaptureEngine.for_model(pl_module))

    trainer = make_trainer(tmp_path, [*monitors, counter, Spy()], max_steps=4, log_every_n_steps=4)
    trainer.fit(model, regression_loader())
    # activation monitor watches net.0, net.1, net.2; dead-unit monitor net.0, net.1, net.2: 3 hooks, not 6
    assert counter.during == [0, 3, 0, 3]
    assert engines[0].hook_calls == 2 * 3  # two sampled batches, one call per module each
    assert hook_count(model) == 0
    assert model not in CaptureEngine._engines


def test_watching_never_changes_numerics_and_leaves_a_picklable_model(tmp_path):
    torch.manual_seed(0)
    watched = TinyRegressor()
    plain = copy.deepcopy(watched)
    make_trainer(tmp_path / "w", [Watch(log_every_n_steps=1, histogram_every_n_steps=2)], max_epochs=2).fit(
        watched, regression_loader()
    )
    make_trainer(tmp_path / "p", [], max_epochs=2).fit(plain, regression_loader())
    for a, b in zip(watched.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert hook_count(watched) == 0
    restored = pickle.loads(pickle.dumps(watched))
    x = torch.randn(5, 4)
    assert torch.equal(restored(x), plain(x))


class DictOut(nn.Module):
    def forward(self, x):
        return {"features": x * 2, "aux": None}


class NoneOut(nn.Module):
    def forward(self, x):
        return None


class IntOut(nn.Module):
    def forward(self, x):
        return (x > 0).long()


class OddModel(TinyRegressor):
    """LSTM (time-first and batch-first), a packed sequence, attention, a dict, None and ints."""

    def __init__(self):
        super().__init__(net=nn.Linear(4, 1))
        self.lstm_tf = nn.LSTM(4, 6)
        self.lstm_bf = nn.GRU(4, 6, batch_first=True)
        self.packed = nn.LSTM(4, 6, batch_first=True)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.dict_out, self.none_out, self.int_out = DictOut(), NoneOut(), IntOut()
        self.head = nn.Linear(6 * 3 + 4, 1)

    def forward(self, x):
        seq = x.unsqueeze(1).repeat(1, 3, 1)  # (batch, seq, feature)
        a = self.lstm_tf(seq.transpose(0, 1))[0][-1]
        b = self.lstm_bf(seq)[0][:, -1]
        lengths = torch.full((x.shape[0],), 3, dtype=torch.long)
        c = self.packed(pack_padded_sequence(seq, lengths, batch_first=True))[1][0][-1]
        d = self.attn(seq, seq, seq)[0][:, -1]
        self.none_out(x)
        self.int_out(x)
        d = d + self.dict_out(x)["features"]
        return self.head(torch.cat([a, b, c, d], dim=1))


def test_odd_outputs_degrade_with_one_warning_each(tmp_path):
    torch.manual_seed(0)
    model = OddModel()
    names = ["lstm_tf", "lstm_bf", "packed", "attn", "dict_out", "none_out", "int_out", "head"]
    monitor = Watch(include=names, log_every_n_steps=2, sample_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [monitor], max_steps=6, log_every_n_steps=2)
        trainer.fit(model, regression_loader())
    ours = [str(w.message) for w in caught if issubclass(w.category, WatchWarning)]
    assert len([m for m in ours if "'none_out'" in m]) == 1  # once, not once per sampled step
    assert len([m for m in ours if "'int_out'" in m and "int64" in m]) == 1
    scalars = read_scalars(trainer.logger.log_dir)
    for name in ("lstm_tf", "lstm_bf", "packed", "attn", "dict_out", "head"):
        assert f"watch/act_rms/{name}" in scalars, name
    assert "watch/act_rms/none_out" not in scalars and "watch/act_rms/int_out" not in scalars
    assert hook_count(model) == 0


def test_a_failing_statistic_disables_that_module_not_the_run(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyRegressor()

    def boom(self, index, captured):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(ActivationScaleMonitor, "consume", boom)
    with pytest.warns(WatchWarning, match="kaboom"):
        make_trainer(tmp_path, [ActivationScaleMonitor(log_every_n_steps=1)], max_steps=3).fit(
            model, regression_loader()
        )
    assert hook_count(model) == 0


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: Watch(log_every_n_steps=0), r"`log_every_n_steps` must be a positive integer or None, got 0"),
        (lambda: Watch(sample_every_n_steps=-3), r"`sample_every_n_steps` must be .* got -3"),
        (lambda: GradientNormMonitor(histogram_every_n_steps=2.5), r"`histogram_every_n_steps` must be .* got 2.5"),
        (lambda: GradientNormMonitor(per_parameter="yes"), r"`per_parameter` must be True or False, got 'yes'"),
        (lambda: ActivationScaleMonitor(saturation_margin=0.7), r"`saturation_margin` must be a number in \(0, 0.5\)"),
        (lambda: DeadUnitMonitor(types=["Lienar"]), r"`types` entry 'Lienar' is not a class in torch.nn"),
        (lambda: DeadUnitMonitor(types=["no.such.Module"]), r"`types` entry 'no.such.Module' could not be imported"),
        (lambda: DeadUnitMonitor(types=[int]), r"must be a subclass of torch.nn.Module"),
        (lambda: ParameterDeltaMonitor(include=["fc", 3]), r"`include` must be a glob string or a list of them"),
        (lambda: Watch(gradients=False, deltas=False, activations=False, dead_units=False), r"at least one monitor"),
        (lambda: Watch(gradients=DeadUnitMonitor()), r"`gradients` must be True, False or a GradientNormMonitor"),
    ],
)
def test_bad_arguments_fail_at_construction(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_compiled_model_keeps_gradient_statistics_and_warns_once_about_outputs(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # counters are process-wide: other tests compile too
    torch.manual_seed(0)
    model = TinyRegressor()
    model.compile(backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2, sample_every_n_steps=1)], max_steps=6)
        trainer.fit(model, regression_loader(n=128))
    ours = [str(w.message) for w in caught if issubclass(w.category, WatchWarning)]
    assert len(ours) == 1 and "torch.compile" in ours[0] and "activation statistics" in ours[0]
    scalars = read_scalars(trainer.logger.log_dir)
    assert len(scalars["watch/grad_norm/net.0"]) == 3 and len(scalars["watch/update_ratio/net.0"]) == 3
    assert "watch/dead_frac/net.0" in scalars  # gradient criterion needs no hook
    assert not any(tag.startswith("watch/act_") for tag in scalars)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompilation per step


# ---------------------------------------------------------------------- a crash in the user's code
class CrashingRegressor(TinyRegressor):
    """Raises in ``training_step`` of batch ``crash_at``, after its forward (a sampled step's hooks are armed)."""

    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.crash_at = crash_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.crash_at:
            raise RuntimeError("a bug in the user's training_step")
        return loss


_MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_OPTIMIZER_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _instance_functions(obj) -> set[str]:
    """Methods or functions set on the instance itself: what patching a method leaves behind."""
    return {name for name, value in vars(obj).items() if inspect.ismethod(value) or inspect.isfunction(value)}


def _crash_fit(tmp_path, callbacks, crash_at: int):
    torch.manual_seed(0)
    model = CrashingRegressor(crash_at)
    trainer = make_trainer(tmp_path, callbacks, max_steps=8, logger=False)
    with pytest.raises(RuntimeError, match="a bug in the user's training_step"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, regression_loader())
    optimizer = trainer.strategy.optimizers[0]
    return model, optimizer, trainer.strategy


def _leftovers(model, optimizer, strategy, baseline) -> list[str]:
    found = [
        f"{name or 'model'}.{attr}"
        for name, module in model.named_modules()
        for attr in _MODULE_HOOKS
        if getattr(module, attr, None)
    ]
    found += [
        f"{name}._post_accumulate_grad_hooks" for name, p in model.named_parameters() if p._post_accumulate_grad_hooks
    ]
    found += [f"optimizer.{attr}" for attr in _OPTIMIZER_HOOKS if getattr(optimizer, attr, None)]
    found += [
        f"global {name}"
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks")
        if getattr(torch.nn.modules.module, name)
    ]
    found += [
        f"global {name}"
        for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
        if getattr(importlib.import_module("torch.optim.optimizer"), name)
    ]
    for what, obj in (("model", model), ("optimizer", optimizer), ("strategy", strategy)):
        found += [f"patched {what}.{name}" for name in sorted(_instance_functions(obj) - baseline[what])]
    found += [
        f"patched {name}.{attr}"
        for name, module in model.named_modules()
        if name
        for attr in _instance_functions(module)
    ]
    return found


@pytest.fixture(scope="module")
def plain_crash(tmp_path_factory):
    """What Lightning itself leaves on the instances after the same crash, with no callback of ours."""
    model, optimizer, strategy = _crash_fit(tmp_path_factory.mktemp("plain"), [], crash_at=2)
    return {
        "model": _instance_functions(model),
        "optimizer": _instance_functions(optimizer),
        "strategy": _instance_functions(strategy),
    }


_STANDALONE = {
    "GradientNormMonitor": lambda: GradientNormMonitor(log_every_n_steps=2, sample_every_n_steps=1),
    "ParameterDeltaMonitor": lambda: ParameterDeltaMonitor(log_every_n_steps=2, sample_every_n_steps=1),
    "ActivationScaleMonitor": lambda: ActivationScaleMonitor(log_every_n_steps=2, sample_every_n_steps=1),
    "DeadUnitMonitor": lambda: DeadUnitMonitor(log_every_n_steps=2, sample_every_n_steps=1),
    "EarlyAlerts": lambda: EarlyAlerts(log_every_n_steps=2),
}


@pytest.mark.parametrize("crash_at", [0, 2], ids=["first-batch", "mid-run"])
@pytest.mark.parametrize("name", list(_STANDALONE))
def test_a_crash_in_training_step_leaves_no_hook_and_a_picklable_model(tmp_path, plain_crash, name, crash_at):
    # Lightning calls no `teardown` after an exception: `on_exception` must undo everything
    callback = _STANDALONE[name]()
    model, optimizer, strategy = _crash_fit(tmp_path, [callback], crash_at)
    assert _leftovers(model, optimizer, strategy, plain_crash) == []
    assert model not in CaptureEngine._engines
    restored = pickle.loads(pickle.dumps(model))
    assert hook_count(restored) == 0


@pytest.mark.parametrize(
    "crash_at",
    [
        pytest.param(0, id="first-batch"),
        pytest.param(2, id="mid-run"),
    ],
)
def test_a_crash_under_watch_leaves_no_hook_and_a_picklable_model(tmp_path, plain_crash, crash_at):
    model, optimizer, strategy = _crash_fit(tmp_path, [Watch(log_every_n_steps=2, sample_every_n_steps=1)], crash_at)
    assert _leftovers(model, optimizer, strategy, plain_crash) == []
    pickle.dumps(model)
