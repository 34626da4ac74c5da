"""Checkpoint resume: monitors' open windows and TensorBoard steps continue across a restart.

A run stopped after 6 steps (mid-window: logging windows are 4 steps) and resumed from its
checkpoint must log exactly what one uninterrupted run logs, at the same steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import make_trainer, quiet_fit, read_scalars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import ActivationScaleMonitor, DeadUnitMonitor, Watch

LOG_EVERY, STOP, TOTAL = 4, 6, 8  # logging steps 3 and 7; the checkpoint falls inside window 4..7


def three_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches 0 and 1 are positive (fc1 units 0 and 1 fire); only batch 2 fires unit 2.

    Steps run the batches 0, 1, 2, 0, 1, 2, 0, 1: the window of logging step 7 is the batches
    1, 2 (before the checkpoint) and 0, 1 (after). Were the window reset on resume, unit 2 would
    look dead and the activation sums would cover half the window.
    """
    g = torch.Generator().manual_seed(0)
    positive = 0.5 + torch.rand(16, 2, generator=g)
    negative = -(0.5 + torch.rand(8, 2, generator=g))
    x = torch.cat([positive, negative])
    y = torch.randn(24, 1, generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]


def step_loader() -> DataLoader:
    # The batch is chosen by the global step in `training_step`: Lightning restarts a plain
    # DataLoader from its first batch after a resume, which would change the data, not the monitors.
    return DataLoader(TensorDataset(torch.zeros(64)), batch_size=1)


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lr = lr
        self.fc1 = nn.Linear(2, 3)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(3, 1)
        self.batches = three_batches()
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
            self.fc1.bias.zero_()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = self.batches[self.global_step % 3]
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def callbacks():
    # two instances of one class with different selections: separate checkpoint state (state_key)
    return [
        ActivationScaleMonitor(include="fc1", log_every_n_steps=LOG_EVERY, sample_every_n_steps=1),
        ActivationScaleMonitor(include=["act", "fc2"], log_every_n_steps=LOG_EVERY, sample_every_n_steps=1),
        DeadUnitMonitor(log_every_n_steps=LOG_EVERY, sample_every_n_steps=1),
    ]


def trainer_for(root: Path, cbs, max_steps: int) -> pl.Trainer:
    logger = pl.loggers.TensorBoardLogger(str(root), name="tb", version=0)
    return make_trainer(root, cbs, max_steps=max_steps, max_epochs=-1, logger=logger, log_every_n_steps=LOG_EVERY)


def fit(trainer: pl.Trainer, lr: float = 0.01, **kwargs) -> None:
    quiet_fit(trainer, Net(lr), step_loader(), **kwargs)


def test_resume_continues_windows_and_steps(tmp_path):
    fit(trainer_for(tmp_path / "whole", callbacks(), TOTAL))
    whole = read_scalars(tmp_path / "whole" / "tb")

    first = trainer_for(tmp_path / "split", callbacks(), STOP)
    fit(first)
    ckpt = tmp_path / "stop.ckpt"
    first.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    keys = [k for k in state if k.startswith("ActivationScaleMonitor")]
    assert len(keys) == 2 and state[keys[0]] != state[keys[1]]  # one entry per instance
    fit(trainer_for(tmp_path / "split", callbacks(), TOTAL), ckpt_path=str(ckpt))
    split = read_scalars(tmp_path / "split" / "tb")

    tags = [t for t in whole if t.startswith("watch/")]
    assert {"watch/act_mean/fc1", "watch/act_rms/fc2", "watch/dead_frac/act", "watch/dead_frac/fc1"} <= set(tags)
    for tag in tags:
        # steps continue (no restart at 0, no duplicates) and values match the uninterrupted run; the
        # first fit's end at step STOP - 1 adds its final, partial window (read, not reset)
        assert [s for s, _ in whole[tag]] == [3, 7], tag
        assert [s for s, _ in split[tag]] == [3, STOP - 1, 7], tag
        for (_, got), (_, want) in zip([p for p in split[tag] if p[0] != STOP - 1], whole[tag]):
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (tag, got, want)
    # the window of step 7 needed the pre-checkpoint batch 2: unit 2 fired only there
    assert dict(whole["watch/dead_frac/act"])[7] == 0.0
    assert dict(whole["watch/dead_frac/act"])[3] == 0.0
    assert dict(whole["watch/dead_frac/fc1"])[7] == 0.0


def test_a_reset_window_would_be_seen(tmp_path):
    # the same resume with the callbacks' state dropped: the comparison above must then fail
    first = trainer_for(tmp_path / "split", callbacks(), STOP)
    fit(first)
    ckpt = tmp_path / "stop.ckpt"
    first.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["callbacks"] = {}
    torch.save(checkpoint, ckpt)
    fit(trainer_for(tmp_path / "split", callbacks(), TOTAL), ckpt_path=str(ckpt))
    split = read_scalars(tmp_path / "split" / "tb")
    assert dict(split["watch/dead_frac/act"])[7] > 0.3  # unit 2 looks dead: half a window


def alert_lines(root: Path) -> list[tuple[str, int, str | None]]:
    lines = (root / "tb" / "version_0" / "alerts.jsonl").read_text().splitlines()
    return [(a["code"], a["step"], a["module"]) for a in map(json.loads, lines)]


def watch() -> Watch:
    return Watch(log_every_n_steps=LOG_EVERY, sample_every_n_steps=1)


def test_watch_resume_keeps_windows_and_raised_alerts(tmp_path):
    # lr 0: "stalled_parameters" is raised at step 7 (its second evaluation), before the
    # checkpoint at 10, and still holds at step 11. Resumed, it must not be raised a second time;
    # the bundled windows (and the loss window) continue too.
    fit(trainer_for(tmp_path / "whole", [watch()], 12), lr=0.0)
    first = trainer_for(tmp_path / "split", [watch()], 10)
    fit(first, lr=0.0)
    first.save_checkpoint(tmp_path / "stop.ckpt")
    resumed = watch()
    fit(trainer_for(tmp_path / "split", [resumed], 12), lr=0.0, ckpt_path=str(tmp_path / "stop.ckpt"))

    whole, split = alert_lines(tmp_path / "whole"), alert_lines(tmp_path / "split")
    assert ("stalled_parameters", 7, "fc1") in whole
    assert not [a for a in whole if a[1] == 11 and a[0] == "stalled_parameters"]  # raised once
    assert split == whole
    # the resumed list holds the restored alerts, none raised again at step 11
    assert sorted((a.code, a.step, a.module) for a in resumed.alerts) == sorted(whole)
    want, got = read_scalars(tmp_path / "whole" / "tb"), read_scalars(tmp_path / "split" / "tb")
    for tag in ("watch/act_rms/fc1", "watch/dead_frac/act", "watch/grad_norm/fc1"):
        assert [s for s, _ in want[tag]] == [3, 7, 11], tag
        # the first fit's final window at step 9 (windowed statistics; gradients are measured on logging steps)
        assert [s for s, _ in got[tag]] == ([3, 7, 11] if "grad_norm" in tag else [3, 7, 9, 11]), tag
        for (_, g), (_, w) in zip([p for p in got[tag] if p[0] != 9], want[tag]):
            assert math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-9), (tag, g, w)


def test_watch_resume_continues_the_loss_window(tmp_path):
    fit(trainer_for(tmp_path / "whole", [watch()], TOTAL))
    first = trainer_for(tmp_path / "split", [watch()], STOP)
    fit(first)
    first.save_checkpoint(tmp_path / "stop.ckpt")
    fit(trainer_for(tmp_path / "split", [watch()], TOTAL), ckpt_path=str(tmp_path / "stop.ckpt"))
    want = read_scalars(tmp_path / "whole" / "tb")["watch/global/loss"]
    got = sorted(read_scalars(tmp_path / "split" / "tb")["watch/global/loss"])  # two event files: order by step
    assert [s for s, _ in want] == [3, 7]
    assert [s for s, _ in got] == [3, STOP - 1, 7]  # the first fit's final, partial window at its last step
    assert math.isclose(got[2][1], want[1][1], rel_tol=1e-6)  # the resumed window covers the whole window
