"""Shared test fixtures: tiny models, tiny data, and TensorBoard's own event reader."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch.snapshot import parse_tag
from lightning_watch.warn import reset_warnings

os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _fresh_warnings():
    reset_warnings()
    yield


class TinyRegressor(pl.LightningModule):
    """A small MLP regressor; ``net`` is an ``nn.Sequential`` the tests can reach into."""

    def __init__(self, net: nn.Module | None = None, lr: float = 0.1, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net if net is not None else nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.lr = lr
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_loader(n: int = 64, in_features: int = 4, batch_size: int = 16, seed: int = 0, shuffle: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def join_two_process_group(rank: int, port: int) -> None:
    """Environment of rank ``rank`` of a 2-process CPU group on loopback, as torchrun would set it.

    DDP tests start their two processes themselves (``torch.multiprocessing.spawn``) and run
    Lightning's ``strategy="ddp"`` inside: one start serves several fits, and it avoids the rare
    exit aborts seen with ``ddp_spawn`` on this machine.
    """
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)


def make_trainer(tmp_path: Path, callbacks, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer writing TensorBoard logs under ``tmp_path``."""
    defaults = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": str(tmp_path),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "logger": pl.loggers.TensorBoardLogger(str(tmp_path), name="tb"),
    }
    defaults.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.Trainer(callbacks=callbacks, **defaults)


def legacy_tag(tag: str) -> str:
    """``watch.grad_norm/01.net.0`` -> ``watch/grad_norm/net.0`` (tests name layers without their index)."""
    parsed = parse_tag(tag)
    if parsed is None:
        return tag
    return f"watch/{parsed[0]}/{parsed[1]}" if parsed[1] is not None else f"watch/global/{parsed[0]}"


def read_scalars(log_dir: str | Path, raw: bool = False) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``log_dir``, read with TensorBoard's own reader.

    Our tags come back spelled ``watch/<metric>/<module>`` and ``watch/global/<metric>`` (via
    :func:`~lightning_watch.snapshot.parse_tag`), so tests name a layer without its position index;
    ``raw=True`` gives the tags as written (tests/test_tag_layout.py checks those).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag if raw else legacy_tag(tag), []).extend((e.step, e.value) for e in acc.Scalars(tag))
        break  # one run directory per test
    # A Trainer fitted twice writes two event files into one directory, and TensorBoard loads them
    # in name order: `...<second>.<host>.<pid>.10` sorts before `....9` within one second.
    return {tag: sorted(points, key=lambda point: point[0]) for tag, points in out.items()}


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyRegressor()
