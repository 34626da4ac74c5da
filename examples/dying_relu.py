"""Dying ReLU, made visible: the same MLP trained sanely and with a learning rate that is too high.

With Adam at ``lr=3e-2`` large updates push many hidden ReLU units into the region where they
output 0 for every input; from then on they get no gradient and never recover. The
``watch.dead_frac`` section of the sick run climbs and stays up, the healthy run's stays near 0.
Digits ship inside scikit-learn: nothing is downloaded. Each run prints its health report.

    python examples/dying_relu.py
    tensorboard --logdir runs/dying_relu
    lightning-watch report runs/dying_relu
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_mlp import DigitsMLP, digits_loaders
from next_steps import print_next_steps

from lightning_watch import Watch


class DeepDigitsMLP(DigitsMLP):
    """Four ReLU layers: more depth, more units to lose."""

    def __init__(self, hidden: int = 64, lr: float = 1e-3) -> None:
        super().__init__(hidden=hidden, lr=lr)
        layers: list[nn.Module] = [nn.Linear(64, hidden), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 10))


def train(lr: float, name: str, epochs: int, logdir: str) -> dict[str, float]:
    pl.seed_everything(0, workers=True)
    train_loader, val_loader = digits_loaders(batch_size=32)
    # the report follows the progress bar by default; this script turns the bar off, so ask for it
    watch = Watch(log_every_n_steps=20, report=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=pl.loggers.TensorBoardLogger(logdir, name="dying_relu", version=name),
        callbacks=[watch],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    trainer.fit(DeepDigitsMLP(lr=lr), train_loader, val_loader)
    return watch.last_snapshot.modules("dead_frac")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)
    healthy = train(1e-3, "healthy_lr1e-3", args.epochs, args.logdir)
    sick = train(3e-2, "sick_lr3e-2", args.epochs, args.logdir)
    print(f"\n{'layer':<10}{'dead (lr=1e-3)':>16}{'dead (lr=3e-2)':>16}")
    for layer in sick:
        if layer in healthy:
            print(f"{layer:<10}{healthy[layer]:>16.0%}{sick[layer]:>16.0%}")
    print_next_steps(os.path.join(args.logdir, "dying_relu"), charts="watch.dead_frac (sick vs healthy run)")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
