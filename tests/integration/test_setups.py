"""Real setups: the Trainer's other entry points, repeated fits, sequence models, fine-tuning.

Each test checks what was logged against a plain-PyTorch recomputation or a closed form, and that
no hook is left behind.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    CountHooks,
    StoreOutputs,
    TinyRegressor,
    leftover_hooks,
    make_trainer,
    quiet,
    read_scalars,
    regression_loader,
)
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import (
    ActivationScaleMonitor,
    DeadUnitMonitor,
    GradientNormMonitor,
    ParameterDeltaMonitor,
    Watch,
)


class Predicting(TinyRegressor):
    def test_step(self, batch, batch_idx):
        self.log("test_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


# ---------------------------------------------------------------------- entry points and repeats
def test_validate_test_predict_around_two_fits_of_one_trainer(tmp_path):
    torch.manual_seed(0)
    model = Predicting()
    watch = Watch(log_every_n_steps=2, sample_every_n_steps=1, alerts=False)
    counter = CountHooks()
    trainer = make_trainer(tmp_path, [watch, counter], limit_train_batches=3, log_every_n_steps=2)
    loader = regression_loader()
    quiet(trainer.validate, model, loader)
    assert leftover_hooks(model) == 0 and watch.last_snapshot is None  # validation is not watched
    quiet(trainer.fit, model, loader, loader)
    assert counter.most == 3 and leftover_hooks(model, trainer) == 0  # hooks existed, and are gone
    first = watch.last_snapshot
    assert first is not None and first.step == 2 and first.final  # logged at 1, then the final window at 2
    quiet(trainer.test, model, loader)
    quiet(trainer.predict, model, loader)
    assert leftover_hooks(model, trainer) == 0
    # a second fit on the same Trainer continues training (one more epoch of 3 batches)
    trainer.fit_loop.max_epochs = 2
    quiet(trainer.fit, model, loader)
    assert trainer.global_step == 6 and leftover_hooks(model, trainer) == 0
    assert watch.last_snapshot.step == 5  # steps continue: logged at 1, 3, 5
    steps = [s for s, _ in read_scalars(trainer.logger.log_dir)["watch/grad_norm/net.0"]]
    assert steps == [1, 3, 5]
    quiet(trainer.validate, model, loader)
    assert leftover_hooks(model, trainer) == 0


class Other(TinyRegressor):
    """A different architecture with different module names."""

    def __init__(self):
        super().__init__(net=None)
        self.net = None
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(self.body(x))


def test_one_callback_instance_across_trainers_and_models_keeps_no_stale_state(tmp_path):
    monitors = [
        GradientNormMonitor(log_every_n_steps=2),
        ParameterDeltaMonitor(log_every_n_steps=2),
        ActivationScaleMonitor(log_every_n_steps=2, sample_every_n_steps=1),
        DeadUnitMonitor(log_every_n_steps=2, sample_every_n_steps=1),
    ]
    torch.manual_seed(0)
    first = TinyRegressor()
    quiet(make_trainer(tmp_path / "a", monitors, max_steps=2).fit, first, regression_loader())
    assert leftover_hooks(first) == 0
    second = Other()
    reference = StoreOutputs(["body.0"])
    trainer = make_trainer(tmp_path / "b", [*monitors, reference], overfit_batches=2, max_epochs=2)
    quiet(trainer.fit, second, regression_loader())
    assert leftover_hooks(second, trainer) == 0
    for monitor in monitors:
        names = {n for metric in monitor.METRICS for n in monitor.last_snapshot.modules(metric)}
        assert names and not any(n.startswith("net.") for n in names), (type(monitor).__name__, names)
    scalars = read_scalars(trainer.logger.log_dir)
    # overfit_batches=2: 2 batches per epoch, 2 epochs, logged at steps 1 and 3
    assert [s for s, _ in scalars["watch/grad_norm/out"]] == [1, 3]
    # each activation window holds exactly its own two steps' outputs
    for step, value in scalars["watch/act_rms/body.0"]:
        x = reference.window("body.0", [step - 1, step]).double()
        assert value == pytest.approx(x.square().mean().sqrt().item(), rel=1e-5)


# ---------------------------------------------------------------------- sequence models


class SequenceTask(pl.LightningModule):
    """Embedding -> TransformerEncoder (1 layer) -> shared ``proj`` applied to every position twice."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.embed = nn.Embedding(11, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.proj = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 1)

    def forward(self, tokens):  # tokens (B, T)
        h = self.embed(tokens if self.batch_first else tokens.t())  # (B, T, E) or (T, B, E)
        h = self.encoder(h)
        h = self.act(self.proj(self.act(self.proj(h))))  # proj and act: two calls each
        return self.head(h).mean(dim=1 if self.batch_first else 0)

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        return nn.functional.mse_loss(self(tokens), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def token_loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (32, 5), generator=g)
    return DataLoader(TensorDataset(tokens, torch.randn(32, 1, generator=g)), batch_size=8)


@pytest.mark.parametrize("batch_first", [True, False])
def test_embedding_transformer_and_a_module_reused_in_one_forward(tmp_path, batch_first):
    names = ["embed", "encoder.layers.0.self_attn", "encoder.layers.0.norm2", "proj", "act"]
    reference = StoreOutputs(names)
    watch = Watch(log_every_n_steps=2, sample_every_n_steps=1, alerts=False)
    trainer = make_trainer(tmp_path, [reference, watch], max_steps=2, log_every_n_steps=2)
    model = SequenceTask(batch_first)
    quiet(trainer.fit, model, token_loader())
    assert leftover_hooks(model, trainer) == 0
    snap = watch.last_snapshot
    for name in names:
        x = reference.window(name, [0, 1]).double()
        assert snap.get("act_mean", name) == pytest.approx(x.mean().item(), rel=1e-5, abs=1e-7), name
        assert snap.get("act_rms", name) == pytest.approx(x.square().mean().sqrt().item(), rel=1e-5), name
    assert len(reference.outputs[("proj", 0)]) == 2  # the reused module ran twice per step
    # dead units aggregate both calls of `act`: a unit alive in either call is alive
    calls = [torch.stack(reference.outputs[("act", s)]) for s in (0, 1)]  # (2 calls, ...)
    alive = torch.stack([(c > 0).flatten(0, -2).any(0) for c in calls]).any(0)
    assert snap.get("dead_frac", "act") == pytest.approx(1 - alive.double().mean().item())
    # the embedding's gradient norm is that of its (dense) weight gradient, nonzero only on used rows
    assert snap.get("grad_norm", "embed") > 0
    assert snap.get("grad_norm", "encoder.layers.0.self_attn") > 0


def test_dead_units_of_a_reused_activation_need_every_call_dead(tmp_path):
    class TwoCalls(TinyRegressor):
        """``act`` first sees ``x`` then ``-x``: every unit fires in one of the two calls."""

        def __init__(self):
            super().__init__(net=nn.Sequential(nn.Identity()))
            self.act = nn.ReLU()
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.act(x) + self.act(-x))

    monitor = DeadUnitMonitor(include="act", log_every_n_steps=1, sample_every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=1)
    quiet(trainer.fit, TwoCalls(), DataLoader(TensorDataset(torch.ones(8, 4), torch.ones(8, 1)), batch_size=8))
    # call 1 fires every unit (x = 1), call 2 none (-x): judged on one call only, all would be dead
    assert monitor.last_snapshot.get("dead_frac", "act") == 0.0


# ---------------------------------------------------------------------- frozen parts, fine-tuning
class Unfreeze(Callback):
    """Unfreezes ``net.0`` at the start of epoch ``at`` (a fine-tuning schedule in miniature)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at:
            pl_module.net[0].requires_grad_(True)


class CopySpy(Callback):
    """Sizes of the parameter copies ParameterDeltaMonitor holds during each optimizer step."""

    def __init__(self, monitor: ParameterDeltaMonitor) -> None:
        self.monitor, self.copied = monitor, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        before = self.monitor._before  # runs after the monitor: its copy of this step exists
        self.copied.append(sum(t.numel() for t in before) if before is not None else 0)


def test_frozen_layer_costs_nothing_and_is_picked_up_when_unfrozen(tmp_path):
    torch.manual_seed(0)
    model = TinyRegressor(lr=0.1)  # SGD: update = lr * gradient
    model.net[0].requires_grad_(False)
    deltas = ParameterDeltaMonitor(log_every_n_steps=1)
    grads = GradientNormMonitor(log_every_n_steps=1)
    spy = CopySpy(deltas)
    loader = regression_loader(n=32)  # 2 batches per epoch
    trainer = make_trainer(tmp_path, [Unfreeze(at=1), deltas, grads, spy], max_epochs=2)
    quiet(trainer.fit, model, loader)
    scalars = read_scalars(trainer.logger.log_dir)
    # epoch 0 (steps 0, 1): net.0 frozen: not reported, no gradient, no copy of its weights
    assert [s for s, _ in scalars["watch/update_norm/net.2"]] == [0, 1, 2, 3]
    assert [s for s, _ in scalars["watch/update_norm/net.0"]] == [2, 3]
    assert [s for s, _ in scalars["watch/grad_norm/net.0"]] == [2, 3]
    net0, net2 = 4 * 8 + 8, 8 * 1 + 1
    assert spy.copied == [net2, net2, net0 + net2, net0 + net2]
    # after unfreezing, the closed form of SGD holds: |update| = lr * |gradient|
    for step in (2, 3):
        update = dict(scalars["watch/update_norm/net.0"])[step]
        grad = dict(scalars["watch/grad_norm/net.0"])[step]
        assert update == pytest.approx(0.1 * grad, rel=1e-5) and grad > 0
