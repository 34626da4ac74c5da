"""ActivityRegularizer: gradients equal a hand-written ``loss + penalty`` in every mode, and it is honest.

Every equivalence test trains two copies of one model from the same weights on the same batches:
one whose ``training_step`` adds the penalty by hand (the reference), one with the callback and no
penalty in its code. Gradients are recorded in ``on_before_optimizer_step`` (unscaled under
mixed precision) at every optimizer step and compared. A third run without any penalty shows
the penalty's contribution is large enough that a wrong scale would fail the comparison.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer, read_scalars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import ActivationScaleMonitor, ActivityRegularizer, ActivityRule
from lightning_watch.regularize_rules import OutputSums, parse_rules, rule_penalty

L1, L2 = 3e-3, 2e-2


def fc2_l1_l2(out: torch.Tensor) -> torch.Tensor:
    """What the hand-written reference adds for the rule ``{"encoder.fc2": {"l1": L1, "l2": L2}}``."""
    o = out.float()
    return (L1 * o.abs().sum() + L2 * o.pow(2).sum()) / out.shape[0]


class Net(pl.LightningModule):
    """encoder (fc1 -> tanh -> fc2) -> sigmoid -> head; ``penalty`` (if set) is the hand-written one.

    ``penalty(name, output)`` is called on the outputs of ``encoder.fc1`` and ``encoder.fc2`` and
    its sum is added to the loss. ``twice`` calls ``encoder.fc2`` a second time per step.
    ``mode``: "auto", "manual" (one optimizer, ``manual_backward``) or "manual2" (two optimizers,
    two forward/backward passes per batch).
    """

    def __init__(self, penalty=None, mode: str = "auto", twice: bool = False, optimizer: str = "sgd") -> None:
        super().__init__()
        self.encoder = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.Tanh(), fc2=nn.Linear(8, 8)))
        self.squash = nn.Sigmoid()
        self.head = nn.Linear(8, 1)
        self.penalty = penalty
        self.mode = mode
        self.twice = twice
        self.optimizer_name = optimizer
        self.automatic_optimization = mode == "auto"

    def loss(self, batch):
        x, y = batch
        h1 = self.encoder.fc1(x)
        h2 = self.encoder.fc2(self.encoder.act(h1))
        extra = 0.0
        if self.penalty is not None:
            extra = self.penalty("encoder.fc1", h1) + self.penalty("encoder.fc2", h2)
        if self.twice:
            h2 = self.encoder.fc2(torch.tanh(h2))
            if self.penalty is not None:
                extra = extra + self.penalty("encoder.fc2", h2)
        out = self.head(self.squash(h2))
        loss = nn.functional.mse_loss(out.float(), y)
        self.log("train_loss", loss)
        return loss + extra

    def training_step(self, batch, batch_idx):
        if self.mode == "auto":
            return self.loss(batch)
        if self.mode == "manual":
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            opt.step()
            return None
        enc_opt, head_opt = self.optimizers()
        enc_opt.zero_grad()
        self.manual_backward(self.loss(batch))
        enc_opt.step()
        head_opt.zero_grad()
        self.manual_backward(self.loss(batch))
        head_opt.step()
        return None

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.head(self.squash(self.encoder(x))), y))

    def configure_optimizers(self):
        make = (
            (lambda p: torch.optim.Adam(p, lr=1e-2))
            if self.optimizer_name == "adam"
            else (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        )
        if self.mode == "manual2":
            return make(self.encoder.parameters()), make(self.head.parameters())
        return make(self.parameters())


def loader(n: int = 48, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class GradRecorder(pl.Callback):
    """Copies every parameter's gradient at each optimizer step (unscaled, before clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def run(model: Net, callbacks, tmp_path, **trainer_kw) -> list[dict[str, torch.Tensor]]:
    recorder = GradRecorder()
    kw = {"max_epochs": 1, "logger": False}
    kw.update(trainer_kw)
    trainer = make_trainer(tmp_path, [*callbacks, recorder], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    return recorder.steps


def max_rel_diff(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b) and len(a) > 0
    worst = 0.0
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for name in sa:
            scale = max(sa[name].abs().max().item(), 1e-12)
            worst = max(worst, (sa[name] - sb[name]).abs().max().item() / scale)
    return worst


def reference_penalty(name, out):
    return fc2_l1_l2(out) if name == "encoder.fc2" else 0.0


def compare(tmp_path, mode="auto", tol=1e-5, twice=False, optimizer="sgd", **trainer_kw):
    torch.manual_seed(0)
    base = Net(mode=mode, twice=twice, optimizer=optimizer)
    hand = copy.deepcopy(base)
    hand.penalty = reference_penalty
    plain = copy.deepcopy(base)
    reg = ActivityRegularizer({"encoder.fc2": {"l1": L1, "l2": L2}})
    got = run(base, [reg], tmp_path / "cb", **trainer_kw)
    want = run(hand, [], tmp_path / "hand", **trainer_kw)
    without = run(plain, [], tmp_path / "plain", **trainer_kw)
    assert max_rel_diff(got, want) < tol
    # the penalty changes the gradients far beyond the tolerance: the comparison is not vacuous
    assert max_rel_diff(without, want) > 100 * tol
    return got


@pytest.mark.parametrize(
    ("mode", "kw"),
    [
        ("auto", {}),
        ("manual", {}),
        ("manual2", {}),
        ("auto", {"accumulate_grad_batches": 2}),
    ],
    ids=["automatic", "manual", "two-optimizers", "accumulate-2"],
)
def test_gradients_equal_hand_written_penalty(tmp_path, mode, kw):
    steps = compare(tmp_path, mode=mode, **kw)
    assert len(steps) == (6 if mode == "auto" and not kw else 3 if kw else 6 if mode == "manual" else 12)
