"""Writing can fail, training cannot: each writer, made to fail, costs one WatchWarning and nothing else."""

from __future__ import annotations

import builtins
import json
import logging
import os
import warnings

import pytest
import torch
from helpers import TinyRegressor, make_trainer, regression_loader
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.tensorboard.writer import FileWriter, SummaryWriter

from lightning_watch import Watch, WatchWarning, writers
from lightning_watch.alerts import sinks
from lightning_watch.views import live


class Quiet(TinyRegressor):
    """No `self.log`: Lightning's own logging never touches the failing logger."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


def fit(tmp_path, **trainer_kwargs):
    """Fit 8 steps with Watch (the unshuffled loader raises an alert at step 0); return losses, watch, warnings."""
    torch.manual_seed(0)
    model = Quiet()
    watch = Watch(log_every_n_steps=2, final_pictures=True)  # the pictures are written (and fail) too
    losses: list[float] = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = make_trainer(tmp_path, [Losses(), watch], max_steps=8, **trainer_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, regression_loader(n=128, batch_size=16))
    ours = [str(w.message) for w in caught if issubclass(w.category, WatchWarning)]
    return losses, watch, [m for m in ours if "could not write" in m], trainer


@pytest.fixture
def baseline(tmp_path_factory):
    losses, _, messages, _ = fit(tmp_path_factory.mktemp("baseline"))
    assert messages == []
    return losses


def failing_open(fragment: str):
    real = builtins.open

    def fake(path, *args, **kwargs):
        if fragment in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    return fake


def test_alerts_jsonl_on_a_read_only_directory(tmp_path, monkeypatch, caplog, baseline):
    monkeypatch.setattr(sinks, "open", failing_open(sinks.JSONL_NAME), raising=False)
    with caplog.at_level(logging.WARNING, logger="lightning_watch.alerts"):
        losses, watch, messages, trainer = fit(tmp_path)
    assert losses == baseline  # the fit ran to the end, unchanged
    assert len(messages) == 1, messages
    assert os.path.join(trainer.log_dir, "alerts.jsonl") in messages[0] and "PermissionError" in messages[0]
    assert watch.alerts, "alerts are still kept"
    assert any(r.name == "lightning_watch.alerts" for r in caplog.records), "alerts still reach logging"
    assert not os.path.exists(os.path.join(trainer.log_dir, "alerts.jsonl"))


def test_health_md_failure_keeps_health_json(tmp_path, monkeypatch, baseline):
    monkeypatch.setattr(live, "open", failing_open(live.HEALTH_MD), raising=False)
    losses, watch, messages, trainer = fit(tmp_path)
    assert losses == baseline
    assert len(messages) == 1 and os.path.join(trainer.log_dir, "health.md") in messages[0], messages
    with open(os.path.join(trainer.log_dir, live.HEALTH_JSON)) as f:
        assert json.load(f)  # the other file is still written
    assert watch.views.last_report is not None


def raising(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("method", ["add_image", "add_text", "layout"])
def test_tensorboard_pictures_text_and_layout_failures(tmp_path, monkeypatch, baseline, method):
    if method == "layout":  # the Custom Scalars layout is written with the scalars of a new metric
        monkeypatch.setattr(writers, "layout_summary", raising)
    else:
        monkeypatch.setattr(SummaryWriter, method, raising)
    losses, watch, messages, trainer = fit(tmp_path)
    assert losses == baseline
    assert len(messages) == 1, messages
    assert "TensorBoardLogger" in messages[0] and trainer.logger.log_dir in messages[0] and "OSError" in messages[0]
    assert watch.alerts and watch.views.last_report is not None


def test_tensorboard_scalar_event_failure(tmp_path, monkeypatch, baseline):
    real = FileWriter.add_summary

    def add_summary(self, summary, global_step=None, walltime=None):
        if any(v.tag.startswith("watch.") for v in summary.value):
            raise OSError(28, "No space left on device")
        return real(self, summary, global_step, walltime)

    monkeypatch.setattr(FileWriter, "add_summary", add_summary)
    losses, watch, messages, _ = fit(tmp_path)
    assert losses == baseline
    assert len(messages) == 1 and "OSError" in messages[0], messages
    assert watch.last_snapshot is not None and watch.last_snapshot.get("grad_norm") > 0


class BrokenLogger(CSVLogger):
    def log_metrics(self, metrics, step=None):
        if any(k.startswith("watch.") for k in metrics):
            raise RuntimeError("the tracking server is down")
        return super().log_metrics(metrics, step)


def test_a_logger_whose_log_metrics_raises(tmp_path, baseline):
    losses, watch, messages, _ = fit(tmp_path, logger=BrokenLogger(str(tmp_path), name="csv"))
    assert losses == baseline
    assert len(messages) == 1 and "BrokenLogger" in messages[0] and "tracking server is down" in messages[0]
    assert watch.last_snapshot.step == 7
