"""The base setups: data, model and LightningModule, all built from one plain config dict.

Every fault of :mod:`.operators` is an edit of this dict, so an original and its mutants share one code
path and differ only where the fault is. The data sets are tiny (sklearn ``load_digits``, 8x8 images, or
synthetic sequences) so that one training takes a few seconds on one CPU thread.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

#: defaults shared by every setup; a setup overrides some, an operator edits the result
BASE: dict[str, Any] = {
    "epochs": 5,
    "max_steps": -1,
    "batch_size": 32,
    "lr": 1e-3,
    "optimizer": "adam",
    "grad_clip": None,
    "validate": True,
    "dropout": 0.1,
    "act": "relu",  # hidden activation: relu | sigmoid | linear
    "logits_act": None,  # None | sigmoid | relu | softmax (applied in forward, before the loss)
    "softmax_batch": False,  # log-softmax over dim 0 (the batch) in forward
    "init": "default",  # default | constant
    "bias": True,  # False: no bias anywhere
    "conv_bias": False,  # the CNN's convolutions before BatchNorm
    "reg": {"first": ("l2", 1e-4)},  # weight penalties added to the loss: {"first"|"all": (kind, lambda)}
    "loss": "ce",  # ce | mse_idx (MSE on class indices) | mse_broadcast ((N, 1) against (N,))
    "manual": False,  # manual optimization
    "zero_grad": True,  # manual optimization: call optimizer.zero_grad()
    "return_none": False,  # manual optimization: training_step returns None
    "detach": False,  # .detach() after the first block in forward
    "freeze_first": False,  # the first layer's parameters have requires_grad=False
    "optimize_head_only": False,  # the optimizer holds only the last layer's parameters
    "view_not_permute": False,  # sequence models: x.view(T, N, F) instead of x.permute(1, 0, 2)
    "label_noise": 0.0,  # fraction of training labels replaced by a random other class
    "remove_data": 0.0,  # fraction of training samples removed
    "unbalance": 0.0,  # fraction removed from each class of the upper half of the classes
    "input_noise": 0.0,  # std of Gaussian noise added to the (standardized) training inputs
    "input_scale": 1.0,  # multiplies every input (255: unnormalized pixels)
}

SETUPS: dict[str, dict[str, Any]] = {
    "mlp": {"model": "mlp", "data": "digits", "epochs": 8},
    "cnn": {"model": "cnn", "data": "digits_images", "epochs": 5},
    "lstm": {"model": "lstm", "data": "seq_sum", "epochs": 6},
    "transformer": {"model": "transformer", "data": "seq_majority", "epochs": 8},
}


def config(setup: str) -> dict[str, Any]:
    """The original (un-mutated) config of ``setup``."""
    if setup not in SETUPS:
        raise ValueError(f"`setup` must be one of {sorted(SETUPS)}, got {setup!r}.")
    cfg = copy.deepcopy(BASE)
    cfg.update(copy.deepcopy(SETUPS[setup]))
    cfg["setup"] = setup
    return cfg


# ---------------------------------------------------------------------------------------------- data
def _standardize(train: Tensor, val: Tensor) -> tuple[Tensor, Tensor]:
    dims = tuple(range(train.dim() - 1))
    mean, std = train.mean(dim=dims), train.std(dim=dims).clamp_min(1e-3)
    return (train - mean) / std, (val - mean) / std


def _raw_data(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(x_train, y_train, x_val, y_val, classes)`` of a data set, standardized, split with a fixed seed."""
    g = torch.Generator().manual_seed(1234)
    if name in ("digits", "digits_images"):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32)  # (1797, 64), pixels 0..16
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=g)
        x, y = x[order], y[order]
        xt, xv = _standardize(x[:1400], x[1400:])
        if name == "digits_images":  # channels-last images (N, 8, 8, 1); the model permutes to (N, C, H, W)
            xt, xv = xt.view(-1, 8, 8, 1), xv.view(-1, 8, 8, 1)
        return xt, y[:1400], xv, y[1400:], 10
    if name == "seq_sum":  # (N, T=12, F=4): the class is the channel with the largest sum over time
        x = torch.randn(2500, 12, 4, generator=g)
        y = x.sum(dim=1).argmax(dim=1)
        return x[:2000], y[:2000], x[2000:], y[2000:], 4
    if name == "seq_majority":  # (N, T=10, F=6) noisy one-hot tokens: the class is the most frequent token
        tokens = torch.randint(0, 6, (2500, 10), generator=g)
        x = F.one_hot(tokens, 6).float() + 0.3 * torch.randn(2500, 10, 6, generator=g)
        counts = F.one_hot(tokens, 6).sum(dim=1).float() - 1e-3 * torch.arange(6)  # ties: lowest token
        y = counts.argmax(dim=1)
        xt, xv = _standardize(x[:2000], x[2000:])
        return xt, y[:2000], xv, y[2000:], 6
    raise ValueError(f"unknown data set {name!r}")


def data(cfg: dict[str, Any], seed: int) -> tuple[TensorDataset, tuple[Tensor, Tensor], int]:
    """The training set (with the config's data faults applied), the validation tensors, and the class count."""
    xt, yt, xv, yv, classes = _raw_data(cfg["data"])
    g = torch.Generator().manual_seed(10_000 + seed)  # data faults: their own generator, fixed per seed
    if cfg["remove_data"] > 0:
        keep = torch.randperm(len(yt), generator=g)[: round(len(yt) * (1 - cfg["remove_data"]))]
        xt, yt = xt[keep], yt[keep]
    if cfg["unbalance"] > 0:
        minority = yt >= classes // 2
        drop = minority & (torch.rand(len(yt), generator=g) < cfg["unbalance"])
        xt, yt = xt[~drop], yt[~drop]
    if cfg["label_noise"] > 0:
        yt = yt.clone()
        flip = torch.rand(len(yt), generator=g) < cfg["label_noise"]
        other = (yt + torch.randint(1, classes, yt.shape, generator=g)) % classes
        yt[flip] = other[flip]
    if cfg["input_noise"] > 0:
        xt = xt + cfg["input_noise"] * torch.randn(xt.shape, generator=g)
    if cfg["input_scale"] != 1.0:
        xt, xv = xt * cfg["input_scale"], xv * cfg["input_scale"]
    return TensorDataset(xt, yt), (xv, yv), classes


# --------------------------------------------------------------------------------------------- model
def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "linear": nn.Identity}[name]()


class _Head(nn.Module):
    def __init__(self, width: int, out: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.drop = nn.Dropout(cfg["dropout"])
        self.hidden = nn.Linear(width, width, bias=cfg["bias"])
        self.act = _act(cfg["act"])
        self.out = nn.Linear(width, out, bias=cfg["bias"])

    def forward(self, h: Tensor) -> Tensor:
        return self.out(self.act(self.hidden(self.drop(h))))


class Net(nn.Module):
    """The setup's network: ``first`` (the first block), ``body``, ``head``; output ``(N, classes or 1)``."""

    def __init__(self, cfg: dict[str, Any], classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        out = 1 if cfg["loss"].startswith("mse") else classes
        bias, kind = cfg["bias"], cfg["model"]
        if kind == "mlp":
            self.first = nn.Sequential(nn.Linear(64, 64, bias=bias), _act(cfg["act"]))
            self.body = nn.Sequential(nn.Dropout(cfg["dropout"]), nn.Linear(64, 64, bias=bias), _act(cfg["act"]))
            self.head = _Head(64, out, cfg)
        elif kind == "cnn":
            cb = cfg["conv_bias"] and bias
            self.first = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=cb), nn.BatchNorm2d(16), _act(cfg["act"]))
            self.body = nn.Sequential(
                nn.Conv2d(16, 32, 3, padding=1, bias=cb),
                nn.BatchNorm2d(32),
                _act(cfg["act"]),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * 4 * 4, 64, bias=bias),
                _act(cfg["act"]),
            )
            self.head = _Head(64, out, cfg)
        elif kind == "lstm":  # time-major LSTM (batch_first=False): forward permutes (N, T, F) -> (T, N, F)
            self.first = nn.LSTM(4, 32, bias=bias)
            self.body = nn.Identity()
            self.head = _Head(32, out, cfg)
        elif kind == "transformer":  # time-major encoder, mean-pooled over time
            self.first = nn.Linear(6, 32, bias=bias)
            act = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "linear": lambda t: t}[cfg["act"]]
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=cfg["dropout"], activation=act, bias=bias)
            self.body = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = _Head(32, out, cfg)
        else:
            raise ValueError(f"unknown model {kind!r}")
        if cfg["init"] == "constant":
            for name, p in self.named_parameters():
                if p.dim() > 1:
                    nn.init.constant_(p, 0.05)
                elif "bias" in name:
                    nn.init.zeros_(p)

    def forward(self, x: Tensor) -> Tensor:
        cfg, kind = self.cfg, self.cfg["model"]
        if kind == "cnn":
            x = x.permute(0, 3, 1, 2)  # (N, 8, 8, 1) -> (N, 1, 8, 8)
        if kind in ("lstm", "transformer"):
            n, t, f = x.shape
            x = x.view(t, n, f) if cfg["view_not_permute"] else x.permute(1, 0, 2)  # (T, N, F)
        h = self.first(x)
        if kind == "lstm":
            h = h[0][-1]  # last time step's output (N, 32)
        if cfg["detach"]:
            h = h.detach()
        h = self.body(h)
        if kind == "transformer":
            h = h.mean(dim=0)  # (N, 32)
        out = self.head(h)
        if cfg["logits_act"] == "sigmoid":
            out = torch.sigmoid(out)
        elif cfg["logits_act"] == "relu":
            out = F.relu(out)
        elif cfg["logits_act"] == "softmax":
            out = out.softmax(dim=1)
        if cfg["softmax_batch"]:
            out = out.log_softmax(dim=0)
        return out


class Module(pl.LightningModule):
    """The LightningModule of every setup and mutant (see :data:`BASE` for the knobs)."""

    def __init__(self, cfg: dict[str, Any], train_set: TensorDataset, classes: int) -> None:
        super().__init__()
        self.cfg, self.train_set, self.classes = cfg, train_set, classes
        self.net = Net(cfg, classes)
        if cfg["freeze_first"]:
            self.net.first.requires_grad_(False)
        self.automatic_optimization = not cfg["manual"]
        self.last_loss: Tensor | None = None  # the last training loss, read once after fit

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _penalty(self) -> Tensor | float:
        total: Tensor | float = 0.0
        for where, (kind, lam) in self.cfg["reg"].items():
            params = self.net.first.parameters() if where == "first" else self.net.parameters()
            for p in params:
                if p.dim() > 1:
                    total = total + lam * (p.abs().sum() if kind == "l1" else p.pow(2).sum())
        return total

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        kind = self.cfg["loss"]
        if kind == "ce":
            return F.cross_entropy(out, y)
        if kind == "mse_idx":
            return F.mse_loss(out.squeeze(-1), y.float())
        return F.mse_loss(out, y.float())  # mse_broadcast: (N, 1) against (N,) broadcasts to (N, N)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        loss = self.loss(self(x), y) + self._penalty()
        self.last_loss = loss.detach()
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        if self.cfg["zero_grad"]:
            opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None if self.cfg["return_none"] else loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", accuracy(self.cfg, self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.net.head.out.parameters() if self.cfg["optimize_head_only"] else self.parameters()
        params = [p for p in params if p.requires_grad] or list(self.net.head.out.parameters())
        if self.cfg["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=self.cfg["lr"])
        return torch.optim.Adam(params, lr=self.cfg["lr"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.cfg["batch_size"], shuffle=True)


def accuracy(cfg: dict[str, Any], out: Tensor, y: Tensor) -> float:
    """Validation accuracy: argmax of the output, or the rounded regression output for the MSE losses."""
    if out.shape[-1] == 1:
        pred = out.squeeze(-1).round().clamp(0, 1e6).long()
    else:
        pred = out.argmax(dim=-1)
    return float((pred == y).float().mean())


def finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
