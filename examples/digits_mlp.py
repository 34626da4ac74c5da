"""Train a small MLP on scikit-learn's digits with ``Watch()`` and look at it in TensorBoard.

The data set ships inside scikit-learn: nothing is downloaded.

    python examples/digits_mlp.py --epochs 20
    tensorboard --logdir runs/digits_mlp
    lightning-watch report runs/digits_mlp
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_watch import Watch


class DigitsMLP(pl.LightningModule):
    def __init__(self, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        # torchmetrics accumulates over the whole validation set (an exact epoch accuracy, synced under DDP)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Digits as float tensors scaled to [0, 1], split 80/20 with a fixed permutation."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, val = order[:split], order[split:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--log-every", type=int, default=10, help="Trainer(log_every_n_steps=...)")
    args = parser.parse_args(argv)

    pl.seed_everything(0, workers=True)
    train, val = digits_loaders()
    logger = pl.loggers.TensorBoardLogger(args.logdir, name="digits_mlp")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=logger,
        log_every_n_steps=args.log_every,
        callbacks=[Watch(histogram_every_n_steps=100)],
        deterministic=True,
    )
    trainer.fit(DigitsMLP(lr=args.lr), train, val)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by file path
    from next_steps import print_next_steps

    print_next_steps(logger.log_dir)


if __name__ == "__main__":
    main()
