"""GradientNormMonitor against gradients recomputed with plain PyTorch on a copy of the model."""

from __future__ import annotations

import copy
import math

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
from torch import nn

from lightning_watch import GradientNormMonitor


def test_per_module_and_global_norms_equal_a_plain_pytorch_reference(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor()
    net = copy.deepcopy(model.net)
    recorder = RecordInputs()
    trainer = make_trainer(tmp_path, [recorder, GradientNormMonitor(log_every_n_steps=2)], max_steps=6)
    trainer.fit(model, regression_loader(n=96, batch_size=16))
    scalars = read_scalars(trainer.logger.log_dir)
    assert [s for s, _ in scalars["watch/global/grad_norm"]] == [1, 3, 5]
    for step in (1, 3, 5):
        grads = reference_grads(net, recorder, step)
        for module in ("net.0", "net.2"):
            expected = module_norm(grads, module)
            assert dict(scalars[f"watch/grad_norm/{module}"])[step] == pytest.approx(expected, rel=1e-5)
        assert dict(scalars["watch/global/grad_norm"])[step] == pytest.approx(norm(grads.values()), rel=1e-5)
    assert all(v == 0 for _, v in scalars["watch/global/grad_nonfinite"])
    assert "watch/grad_norm/net.1" not in scalars  # a ReLU owns no parameter
    assert "watch/global/grad_norm_clipped" not in scalars  # no clipping configured


def test_global_norm_covers_every_stepped_parameter_whatever_is_watched(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor()
    net = copy.deepcopy(model.net)
    recorder = RecordInputs()
    trainer = make_trainer(tmp_path, [recorder, GradientNormMonitor(include="net.2", log_every_n_steps=1)], max_steps=1)
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    grads = reference_grads(net, recorder, 0)
    assert {t for t in scalars if t.startswith("watch/grad_norm/")} == {"watch/grad_norm/net.2"}
    assert scalars["watch/global/grad_norm"][0][1] == pytest.approx(norm(grads.values()), rel=1e-5)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_norms_are_measured_before_clipping_and_after_it(tmp_path, algorithm):
    torch.manual_seed(0)
    clip = 0.05
    model = TinyRegressor(lr=0.02)
    net = copy.deepcopy(model.net)
    recorder = RecordInputs()
    monitor = GradientNormMonitor(log_every_n_steps=1)
    trainer = make_trainer(
        tmp_path, [recorder, monitor], max_steps=3, gradient_clip_val=clip, gradient_clip_algorithm=algorithm
    )
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    for step in range(3):
        grads = reference_grads(net, recorder, step)
        pre = norm(grads.values())
        if algorithm == "norm":  # torch.nn.utils.clip_grad_norm_: scale by clip / (norm + 1e-6) when above
            post = pre * min(1.0, clip / (pre + 1e-6))
        else:
            post = norm(g.clamp(-clip, clip) for g in grads.values())
        assert dict(scalars["watch/global/grad_norm"])[step] == pytest.approx(pre, rel=1e-5)
        assert dict(scalars["watch/global/grad_norm_clipped"])[step] == pytest.approx(post, rel=1e-5)
        assert post < pre  # clipping was active: the two curves differ
        # per-module norms are the pre-clip ones too
        assert dict(scalars["watch/grad_norm/net.0"])[step] == pytest.approx(module_norm(grads, "net.0"), rel=1e-5)


def test_nonfinite_gradient_values_are_counted_exactly(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor(net=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 1)))
    poison_w = torch.zeros(8, 4)
    poison_w[0, 0] = poison_w[5, 3] = math.nan
    poison_w[2, 1] = math.inf
    poison_b = torch.zeros(3)
    poison_b[1] = -math.inf
    model.net[0].weight.register_hook(lambda g: g + poison_w)
    model.net[2].bias.register_hook(lambda g: g + poison_b)
    trainer = make_trainer(tmp_path, [GradientNormMonitor(log_every_n_steps=1)], max_steps=1)
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert scalars["watch/grad_nonfinite/net.0"] == [(0, 3.0)]
    assert scalars["watch/grad_nonfinite/net.2"] == [(0, 1.0)]
    assert scalars["watch/grad_nonfinite/net.3"] == [(0, 0.0)]
    assert scalars["watch/global/grad_nonfinite"] == [(0, 4.0)]
    assert math.isnan(scalars["watch/grad_norm/net.0"][0][1])  # shown, never hidden
    assert scalars["watch/grad_norm/net.2"][0][1] == math.inf
    assert math.isfinite(scalars["watch/grad_norm/net.3"][0][1])


def test_per_parameter_norms_are_tagged_by_name_and_equal_the_reference(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor()
    net = copy.deepcopy(model.net)
    recorder = RecordInputs()
    trainer = make_trainer(
        tmp_path, [recorder, GradientNormMonitor(per_parameter=True, log_every_n_steps=1)], max_steps=1
    )
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    grads = reference_grads(net, recorder, 0)
    per_param = {t.removeprefix("watch/grad_norm/") for t in scalars if t.startswith("watch/grad_norm/net.")}
    assert per_param == {"net.0", "net.2", "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    for name, grad in grads.items():
        assert scalars[f"watch/grad_norm/{name}"][0][1] == pytest.approx(float(grad.norm()), rel=1e-5)


def test_accumulated_gradient_is_measured_once_per_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor()
    net = copy.deepcopy(model.net)
    recorder = RecordInputs()
    trainer = make_trainer(
        tmp_path, [recorder, GradientNormMonitor(log_every_n_steps=1)], accumulate_grad_batches=2, max_epochs=1
    )
    trainer.fit(model, regression_loader(n=64, batch_size=16))  # 4 micro-batches, 2 optimizer steps
    scalars = read_scalars(trainer.logger.log_dir)
    assert [s for s, _ in scalars["watch/global/grad_norm"]] == [0, 1]
    for step in (0, 1):
        assert len(recorder.batches[step]) == 2
        grads = reference_grads(net, recorder, step)
        assert dict(scalars["watch/global/grad_norm"])[step] == pytest.approx(norm(grads.values()), rel=1e-5)


def test_frozen_modules_are_not_reported_and_unstepped_ones_are(tmp_path):
    class Partial(TinyRegressor):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net[0].parameters(), lr=0.1)  # net.2 requires grad, no optimizer

    torch.manual_seed(0)
    model = Partial(net=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 1)))
    model.net[3].requires_grad_(False)
    net = copy.deepcopy(model.net)
    recorder = RecordInputs()
    trainer = make_trainer(tmp_path, [recorder, GradientNormMonitor(log_every_n_steps=1)], max_steps=1)
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    grads = reference_grads(net, recorder, 0)
    assert "watch/grad_norm/net.3" not in scalars
    assert scalars["watch/grad_norm/net.2"][0][1] == pytest.approx(module_norm(grads, "net.2"), rel=1e-5)
    # the global norm is what the optimizer steps: net.0 only
    assert scalars["watch/global/grad_norm"][0][1] == pytest.approx(module_norm(grads, "net.0"), rel=1e-5)


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
        assert logged[step] == pytest.approx(norm([grads["net.0.weight"], grads["net.0.bias"]]), rel=1e-5)
        assert dict(scalars["watch/global/grad_norm"])[step] == pytest.approx(norm(grads.values()), rel=1e-5)
        clipped = dict(scalars["watch/global/grad_norm_clipped"])[step]
        assert clipped == pytest.approx(norm(ref.post[step].values()), rel=1e-5)
        assert clipped <= 0.05 * (1 + 1e-4) < dict(scalars["watch/global/grad_norm"])[step]
    assert all(v == 0 for _, v in scalars["watch/global/grad_nonfinite"])
