"""Kernel vs activity regularization on the "saturated sigmoid" of the classic Keras question.

The inputs are small (in [0, 1)) and so are the weights (|w| <= 0.3), yet the first layer's
outputs are around ±115: 1024 positive inputs times same-signed weights add up. The sigmoid after
it is saturated, its gradient is about exp(-115), and the layer never learns its way out.

Three runs of the same model on the same synthetic data (nothing is downloaded):

- ``plain``: no regularization; the sigmoid stays saturated.
- ``weight_decay``: a *kernel* regularizer (weight decay 5e-3): it shrinks every weight by
  0.05 % a step, so after 640 steps fc1's outputs are still around ±80 and the sigmoid is still
  saturated. The weights were never the problem.
- ``activity``: ``ActivityRegularizer({"fc1": {"l2": 5e-3}})``, a penalty on fc1's *outputs*:
  their scale comes down within a few dozen steps and the sigmoid leaves saturation.

    python examples/activity_regularization.py
    tensorboard --logdir runs/activity_regularization
    lightning-watch report runs/activity_regularization

Charts: sections ``watch.act_saturated_frac`` (``squash``) and ``watch.act_rms`` (``fc1``) from
ActivationScaleMonitor, ``watch.activity_rms`` and ``watch.activity_penalty`` (``fc1``) from
ActivityRegularizer.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from next_steps import print_next_steps

from lightning_watch import ActivationScaleMonitor, ActivityRegularizer


class SaturatedSigmoid(pl.LightningModule):
    """fc1 (1024 -> 16, small same-signed weights) -> sigmoid -> head."""

    def __init__(self, weight_decay: float = 0.0, lr: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1024, 16)
        with torch.no_grad():
            sign = torch.where(torch.arange(16) % 2 == 0, 1.0, -1.0)[:, None]  # (16, 1)
            self.fc1.weight.uniform_(0.15, 0.3).mul_(sign)
            self.fc1.bias.zero_()
        self.squash = nn.Sigmoid()
        self.head = nn.Linear(16, 1)
        self.weight_decay = weight_decay
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.squash(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)  # the callback leaves this alone: it is the loss without the penalty
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def synthetic_loader(n: int = 1024, batch_size: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1024, generator=g)  # small, positive inputs
    y = 20 * (x[:, :512].mean(1, keepdim=True) - x[:, 512:].mean(1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


def train(name: str, epochs: int, logdir: str, weight_decay: float = 0.0, l2: float | None = None) -> dict[str, float]:
    pl.seed_everything(0, workers=True)
    scale = ActivationScaleMonitor(include=["fc1", "squash"], log_every_n_steps=10)
    callbacks: list[pl.Callback] = [scale]
    if l2 is not None:
        callbacks.append(ActivityRegularizer({"fc1": {"l2": l2}}, log_every_n_steps=10))
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=pl.loggers.TensorBoardLogger(logdir, name="activity_regularization", version=name),
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    model = SaturatedSigmoid(weight_decay=weight_decay)
    trainer.fit(model, synthetic_loader())
    snap = scale.last_snapshot
    return {
        "fc1 RMS": snap.get("act_rms", "fc1"),
        "sigmoid saturated": snap.get("act_saturated_frac", "squash"),
        "|w| max": model.fc1.weight.abs().max().item(),
        "train_loss": trainer.callback_metrics["train_loss"].item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)
    runs = {
        "plain": train("plain", args.epochs, args.logdir),
        "weight_decay": train("weight_decay", args.epochs, args.logdir, weight_decay=5e-3),
        "activity": train("activity", args.epochs, args.logdir, l2=5e-3),
    }
    columns = list(next(iter(runs.values())))
    print(f"\n{'run':<14}" + "".join(f"{c:>19}" for c in columns))
    for name, row in runs.items():
        print(f"{name:<14}" + "".join(f"{row[c]:>19.3g}" for c in columns))
    print_next_steps(
        os.path.join(args.logdir, "activity_regularization"), charts="watch.act_saturated_frac, watch.act_rms"
    )


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
