"""``lightning-watch report`` re-diagnoses a finished run from its logged values, and never calls silence health."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyRegressor, make_trainer, read_scalars, regression_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import ActivationScaleMonitor, Watch
from lightning_watch.command import main
from lightning_watch.views.eventfiles import parse_tag
from lightning_watch.views.live import HEALTH_JSON
from lightning_watch.views.offline import rediagnose, snapshots_from_scalars


class SaturatedSigmoid(pl.LightningModule):
    """The README's sick example: fc1 (1024 -> 16, small same-signed weights) -> sigmoid -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1024, 16)
        with torch.no_grad():
            sign = torch.where(torch.arange(16) % 2 == 0, 1.0, -1.0)[:, None]  # (16, 1)
            self.fc1.weight.uniform_(0.15, 0.3).mul_(sign)
            self.fc1.bias.zero_()
        self.squash = nn.Sigmoid()
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.squash(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _report(capsys, *argv):
    rc = main(["report", *argv, "-q"])
    out, _ = capsys.readouterr()
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def sick_run(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.rand(128, 1024)
    y = torch.rand(128, 1)
    model = SaturatedSigmoid()
    # only a monitor: no alert engine ran during the fit, so alerts.jsonl is never written
    trainer = make_trainer(tmp_path_factory.mktemp("sick"), [ActivationScaleMonitor(log_every_n_steps=4)], max_epochs=4)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    with torch.no_grad():  # plain PyTorch, independently of the monitor: fc1's output RMS, final weights
        rms = model.fc1(x[-32:]).pow(2).mean().sqrt().item()
    return trainer.log_dir, rms


def test_monitor_only_run_gets_an_offline_verdict(sick_run, capsys):
    log_dir, rms = sick_run
    payload = json.loads(_report(capsys, log_dir, "--json"))
    (run,) = payload["runs"]
    assert run["checked"] is True and run["healthy"] is False
    found = {(a["code"], a["module"]): a for a in run["alerts"]}
    assert set(found) == {("activation_explosion", "fc1"), ("saturated_units", "squash")}
    assert all(a["source"] == "offline" for a in found.values())
    explosion = found[("activation_explosion", "fc1")]
    # the README's numbers: RMS around 116, far above the rule's bound of 100
    assert explosion["value"] == pytest.approx(rms, rel=0.05) and rms > 100
    assert explosion["step"] == 7  # held for the rule's patience (2 logging steps: 3 and 7)
    scalars = read_scalars(log_dir)
    assert explosion["value"] == pytest.approx(dict(scalars["watch/act_rms/fc1"])[7])
    assert found[("saturated_units", "squash")]["value"] == pytest.approx(1.0)
    assert "re-diagnosed offline" in run["notes"][0] and "4 logging steps" in run["notes"][0]
    text = _report(capsys, log_dir)
    assert "healthy" not in text
    assert "activation_explosion in fc1" in text and "saturated_units in squash" in text
    assert "re-diagnosed offline from the logged statistics" in text


def test_run_that_ends_before_its_first_logging_step(tmp_path, capsys):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [Watch(pictures=False, report=False, log_every_n_steps=50)], max_steps=6)
    trainer.fit(TinyRegressor(), regression_loader(n=128))
    ours = [t for t in read_scalars(trainer.log_dir) if parse_tag(t) is not None]
    payload = json.loads(_report(capsys, trainer.log_dir, "--json"))
    (run,) = payload["runs"]
    live = json.loads((tmp_path / "tb" / "version_0" / HEALTH_JSON).read_text())
    if ours:  # a fit that flushes its last, partial window: then the values are judged
        assert run["checked"] is True and "re-diagnosed offline" in run["notes"][0]
    else:
        # not healthy (at most the fit-start checks' alerts, e.g. unshuffled data, can say it is sick)
        assert run["checked"] is False and run["healthy"] is not True
        assert run["notes"][0].startswith("not checked: no statistics were logged")
        assert live["checked"] is False and live["healthy"] is not True
        assert "no logging step was reached" in live["notes"][0] and "log_every_n_steps=10" in live["notes"][0]
        text = _report(capsys, trainer.log_dir)
        assert "Not checked: no statistics were logged" in text and "healthy" not in text


def test_run_that_crashed_in_setup_is_not_checked(tmp_path, capsys):
    class Broken(TinyRegressor):
        def on_train_start(self):  # after the logger started its event file, before any step
            raise RuntimeError("crashed before training")

    trainer = make_trainer(tmp_path, [ActivationScaleMonitor(log_every_n_steps=1)], max_steps=4)
    trainer.logger.log_hyperparams({"lr": 0.1})  # Lightning does this at fit start too: the event file exists
    with pytest.raises(RuntimeError, match="crashed before training"):
        trainer.fit(Broken(), regression_loader())
    text = _report(capsys, trainer.log_dir)
    assert "Not checked: no statistics were logged" in text and "healthy" not in text
    (run,) = json.loads(_report(capsys, trainer.log_dir, "--json"))["runs"]
    assert run["checked"] is False and run["healthy"] is None and run["layers"] == []


def test_rules_see_both_tag_layouts_alike():
    old = {"watch/dead_frac/fc1": [(4, 0.9), (9, 0.95)], "watch/global/loss": [(4, 1.0), (9, 1.0)]}
    new = {"watch.dead_frac/fc1": [(4, 0.9), (9, 0.95)], "watch.global/loss": [(4, 1.0), (9, 1.0)]}
    a, b = rediagnose(old), rediagnose(new)
    assert [(x["code"], x["module"], x["step"]) for x in a.alerts] == [("dead_units", "fc1", 9)]
    assert a.alerts == b.alerts and a.steps == b.steps == 2


def test_snapshots_leave_validation_statistics_out_and_keep_non_finite_values():
    snaps = snapshots_from_scalars(
        {"watch/grad_norm/fc1": [(0, math.inf)], "watch/val_act_rms/fc1": [(3, 1.0)], "train_loss": [(0, 2.0)]}
    )
    assert [s.step for s in snaps] == [0] and math.isinf(snaps[0].get("grad_norm", "fc1"))
    assert parse_tag("watch_report/health") is None and parse_tag("watch/") is None


def test_a_non_finite_gradient_silences_the_other_rules_like_the_live_engine():
    scalars = {
        "watch/grad_norm/fc1": [(0, math.nan), (1, math.nan)],
        "watch/grad_nonfinite/fc1": [(0, 3.0), (1, 3.0)],
        "watch/global/grad_nonfinite": [(0, 3.0), (1, 3.0)],
        "watch/dead_frac/fc1": [(0, 1.0), (1, 1.0)],  # garbage once values are NaN: not a dead layer
    }
    codes = [(a["code"], a["severity"], a["steps"]) for a in rediagnose(scalars).alerts]
    assert codes == [("non_finite_gradients", "error", 2)]
