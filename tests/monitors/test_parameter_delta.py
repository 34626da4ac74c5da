"""ParameterDeltaMonitor against closed forms: SGD moves W by lr·g, Adam's first step by lr per entry."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    RecordGrads,
    RecordInputs,
    TinyRegressor,
    make_trainer,
    module_norm,
    norm,
    read_scalars,
    reference_grads,
    regression_loader,
)
from lightning.pytorch import Callback
from torch import nn

from lightning_watch import GradientNormMonitor, ParameterDeltaMonitor


def _weights(recorder: RecordInputs, step: int, module: str) -> list[torch.Tensor]:
    return [v for k, v in recorder.weights[step].items() if k.rpartition(".")[0] == module]


def test_sgd_update_norm_is_lr_times_gradient_norm_and_ratio_divides_by_weights_before(tmp_path):
    torch.manual_seed(0)
    lr = 0.05
    model = TinyRegressor(lr=lr)
    net = copy.deepcopy(model.net)
    recorder = RecordInputs()
    trainer = make_trainer(tmp_path, [recorder, ParameterDeltaMonitor(log_every_n_steps=2)], max_steps=4)
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert [s for s, _ in scalars["watch/update_norm/net.0"]] == [1, 3]
    total_update = total_weight = 0.0
    for step in (1, 3):
        grads = reference_grads(net, recorder, step)
        for module in ("net.0", "net.2"):
            update = lr * module_norm(grads, module)
            weight = norm(_weights(recorder, step, module))
            assert dict(scalars[f"watch/update_norm/{module}"])[step] == pytest.approx(update, rel=1e-4)
            assert dict(scalars[f"watch/param_norm/{module}"])[step] == pytest.approx(weight, rel=1e-6)
            assert dict(scalars[f"watch/update_ratio/{module}"])[step] == pytest.approx(update / weight, rel=1e-4)
            if step == 3:
                total_update += update**2
                total_weight += weight**2
    global_ratio = dict(scalars["watch/global/update_ratio"])[3]
    assert global_ratio == pytest.approx((total_update / total_weight) ** 0.5, rel=1e-4)
    assert [v for _, v in scalars["watch/global/optimizer_steps"]] == [1, 1]


def test_adam_first_step_moves_each_entry_by_lr(tmp_path):
    """Adam's first update is lr * g / (|g| + eps): every entry with a gradient moves by lr."""
    torch.manual_seed(0)
    lr = 1e-3
    model = TinyRegressor(lr=lr, optimizer="adam")
    net = copy.deepcopy(model.net)
    recorder = RecordInputs()
    trainer = make_trainer(tmp_path, [recorder, ParameterDeltaMonitor(log_every_n_steps=1)], max_steps=1)
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    grads = reference_grads(net, recorder, 0)
    for module in ("net.0", "net.2"):
        moved = sum(int((g.abs() > 1e-6).sum()) for name, g in grads.items() if name.startswith(module + "."))
        assert scalars[f"watch/update_norm/{module}"][0][1] == pytest.approx(lr * moved**0.5, rel=1e-3)


class Partial(TinyRegressor):
    """``net.2`` requires a gradient but no optimizer holds it; ``net.3`` is frozen."""

    def __init__(self):
        super().__init__(net=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 1)))
        self.net[3].requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net[0].parameters(), lr=0.1)


def test_a_parameter_outside_the_optimizer_shows_zero_and_a_frozen_module_nothing(tmp_path):
    torch.manual_seed(0)
    model = Partial()
    trainer = make_trainer(tmp_path, [ParameterDeltaMonitor(log_every_n_steps=1)], max_steps=3)
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert [v for _, v in scalars["watch/update_norm/net.2"]] == [0.0, 0.0, 0.0]
    assert [v for _, v in scalars["watch/update_ratio/net.2"]] == [0.0, 0.0, 0.0]
    assert all(v > 0 for _, v in scalars["watch/param_norm/net.2"])
    assert all(v > 0 for _, v in scalars["watch/update_norm/net.0"])
    assert not any(tag.endswith("/net.3") for tag in scalars)


def test_accumulation_measures_one_optimizer_step_at_lightnings_steps(tmp_path):
    torch.manual_seed(0)
    lr = 0.1
    model = TinyRegressor(lr=lr)
    net = copy.deepcopy(model.net)
    recorder = RecordInputs()
    trainer = make_trainer(
        tmp_path, [recorder, ParameterDeltaMonitor(log_every_n_steps=1)], accumulate_grad_batches=2, max_epochs=1
    )
    trainer.fit(model, regression_loader(n=96, batch_size=16))  # 6 micro-batches: 3 optimizer steps
    scalars = read_scalars(trainer.logger.log_dir)
    assert [s for s, _ in scalars["watch/update_norm/net.0"]] == [0, 1, 2]
    assert [v for _, v in scalars["watch/global/optimizer_steps"]] == [1, 1, 1]
    for step in (0, 1, 2):
        grads = reference_grads(net, recorder, step)  # both micro-batches, loss / 2 each
        expected = lr * module_norm(grads, "net.0")
        assert dict(scalars["watch/update_norm/net.0"])[step] == pytest.approx(expected, rel=1e-4)


def _tensors_held(obj, params, seen=None) -> int:
    """Elements of every tensor reachable from ``obj``'s attributes that is not a live parameter."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return 0 if any(obj is p for p in params) else obj.numel()
    if isinstance(obj, dict):
        return sum(_tensors_held(v, params, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_tensors_held(v, params, seen) for v in obj)
    if type(obj).__module__.startswith("lightning_watch") and hasattr(obj, "__dict__"):
        return sum(_tensors_held(v, params, seen) for v in vars(obj).values())  # the monitor and its helpers
    return 0


def test_no_weight_copy_survives_a_logging_step(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor(net=nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 1)))
    monitor = ParameterDeltaMonitor(log_every_n_steps=2)
    held = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            held.append(_tensors_held(monitor, list(pl_module.parameters())))

    trainer = make_trainer(tmp_path, [monitor, Probe()], max_steps=5)
    trainer.fit(model, regression_loader(n=80))
    assert len(held) == 5
    # between logging steps the monitor keeps a few numbers per module, never a copy of the 4544 weights
    assert 0 < max(held) < 64, held
    assert _tensors_held(monitor, list(model.parameters())) < 64
    assert "watch/update_norm/net.2" in read_scalars(trainer.logger.log_dir)


def test_the_transient_copy_exists_only_inside_the_logging_step(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor()
    monitor = ParameterDeltaMonitor(log_every_n_steps=2)
    copies = []

    class Probe(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            copies.append(sum(t.numel() for t in (monitor._before or [])))

    trainer = make_trainer(tmp_path, [monitor, Probe()], max_steps=4)
    trainer.fit(model, regression_loader())
    n = sum(p.numel() for p in model.parameters())
    assert copies == [0, n, 0, n]  # only on the logging steps 1 and 3
    assert monitor._before is None


def test_sgd_update_is_lr_times_gradient_and_param_norm_is_taken_before_the_step(tmp_path):
    torch.manual_seed(0)
    lr = 0.05
    ref = RecordGrads()
    trainer = make_trainer(tmp_path, [ref, ParameterDeltaMonitor(log_every_n_steps=2)], max_steps=4)
    trainer.fit(TinyRegressor(lr=lr), regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    for step in (1, 3):
        g = ref.pre[step]
        update = dict(scalars["watch/update_norm/net.2"])[step]
        assert update == pytest.approx(lr * norm([g["net.2.weight"], g["net.2.bias"]]), rel=1e-4)
        before = norm([ref.before[step]["net.2.weight"], ref.before[step]["net.2.bias"]])
        assert dict(scalars["watch/param_norm/net.2"])[step] == pytest.approx(before, rel=1e-5)
        assert dict(scalars["watch/update_ratio/net.2"])[step] == pytest.approx(update / before, rel=1e-5)
    assert all(v == 1 for _, v in scalars["watch/global/optimizer_steps"])


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
        expected = lr * norm([g["net.0.weight"], g["net.0.bias"]])
        assert dict(scalars["watch/update_norm/net.0"])[step] == pytest.approx(expected, rel=1e-4)
        assert dict(scalars["watch/grad_norm/net.0"])[step] == pytest.approx(expected / lr, rel=1e-5)
