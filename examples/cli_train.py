"""Train a small MLP from the command line with LightningCLI; every callback is set in YAML.

Synthetic data (nothing is downloaded). The callbacks come from ``examples/cli_config.yaml``:

    python examples/cli_train.py fit --config examples/cli_config.yaml
    python examples/cli_train.py fit --config examples/cli_config.yaml --trainer.max_steps=20
    tensorboard --logdir runs/cli_train
    lightning-watch report runs/cli_train
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MLP(pl.LightningModule):
    """``encoder`` (Linear, ReLU, Linear, Tanh) then ``head``: a regressor on 8 features."""

    def __init__(self, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class SyntheticData(pl.LightningDataModule):
    """``y = sin(x . w)`` plus noise, for a fixed random ``w``; seeded, so every run sees the same data."""

    def __init__(self, samples: int = 512, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.samples, self.batch_size, self.seed = samples, batch_size, seed

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.samples, 8, generator=g)
        y = torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.05 * torch.randn(self.samples, 1, generator=g)
        split = self.samples * 7 // 8
        self.train_set, self.val_set = TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def main(args=None) -> LightningCLI:
    cli = LightningCLI(MLP, SyntheticData, seed_everything_default=0, args=args)
    if cli.trainer.log_dir and cli.trainer.is_global_zero:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by file path
        from next_steps import print_next_steps

        print_next_steps(cli.trainer.log_dir)
    return cli


if __name__ == "__main__":
    main()
