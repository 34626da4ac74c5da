"""EarlyAlerts, the callback: sinks read back independently, dedupe, actions, configuration errors, resume, DDP."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import join_two_process_group, make_trainer, quiet_fit, read_points
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import EarlyAlerts, GradientNormMonitor, Watch
from lightning_watch.alerts import AlertError, AlertWarning, RuleContext
from lightning_watch.hub import StatHub
from lightning_watch.snapshot import Snapshot


class Net(pl.LightningModule):
    """A small classifier; ``bad_lr`` makes the loss NaN within a few steps."""

    def __init__(self, lr: float = 1e-3, opt: str = "adam"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.lr, self.opt = lr, opt

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        cls = torch.optim.SGD if self.opt == "sgd" else torch.optim.Adam
        return cls(self.parameters(), lr=self.lr)


def data(n=256, batch_size=16, shuffle=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3]).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def nan_model():
    torch.manual_seed(0)
    return Net(lr=1e8, opt="sgd")


# ---------------------------------------------------------------------- sinks
def test_alerts_reach_jsonl_tensorboard_and_logging(tmp_path, caplog):
    watch = Watch(log_every_n_steps=5)
    trainer = make_trainer(tmp_path, [watch], max_steps=20, log_every_n_steps=5)
    with caplog.at_level(logging.INFO, logger="lightning_watch.alerts"):
        quiet_fit(trainer, nan_model(), data(shuffle=False), seed=0)
    raised = watch.alerts
    assert {"non_finite_loss", "unshuffled_data"} <= {a.code for a in raised}

    # alerts.jsonl: one strict JSON object per raised alert, in order, in the logger's directory
    lines = (Path(trainer.log_dir) / "alerts.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["code"] for r in records] == [a.code for a in raised]
    nan_loss = next(r for r in records if r["code"] == "non_finite_loss")
    assert nan_loss["severity"] == "error" and nan_loss["module"] is None and nan_loss["hint"]
    assert set(nan_loss) >= {"code", "severity", "step", "epoch", "module", "value", "threshold", "message", "hint"}

    # TensorBoard text, read with TensorBoard's own reader (text plugin tensors)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    assert "alerts/non_finite_loss/text_summary" in acc.Tags()["tensors"]
    event = acc.Tensors("alerts/non_finite_loss/text_summary")[0]
    text = event.tensor_proto.string_val[0].decode()
    assert "non_finite_loss" in text and "gradient clipping" in text and event.step == nan_loss["step"]

    # logging: one record per alert, at the alert's severity
    ours = [r for r in caplog.records if r.name == "lightning_watch.alerts" and "] " in r.getMessage()]
    assert [r.getMessage().split("]")[0][1:] for r in ours[: len(raised)]] == [a.severity for a in raised]
    assert any(r.levelno == logging.ERROR and "non_finite_loss" in r.getMessage() for r in ours)


def test_nan_loss_is_caught_at_the_first_sampled_step_between_logging_steps(tmp_path):
    # logging every 50 steps, sampling every 10: the kept losses are folded, and the NaN told, at the
    # first sampled step at or after it (CPU), long before the logging step
    watch = Watch(log_every_n_steps=50)
    losses = []

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = make_trainer(tmp_path, [watch, Recorder()], max_steps=30, logger=False)
    quiet_fit(trainer, nan_model(), data(), seed=0)
    first_bad = next(i for i, v in enumerate(losses) if not math.isfinite(v))
    alert = next(a for a in watch.alerts if a.code == "non_finite_loss")
    sample = watch.monitors[0].cadence.sample
    first_sampled = next(s for s in range(first_bad, 50) if (s + 1) % sample == 0)
    assert alert.step == first_sampled < 49


def test_warnings_once_per_code_and_module_and_no_spam(tmp_path):
    watch = Watch(log_every_n_steps=2)
    trainer = make_trainer(tmp_path, [watch], max_steps=40, logger=False)
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(nan_model(), data())
    ours = [w for w in caught if issubclass(w.category, AlertWarning)]
    keys = [a.key for a in watch.alerts if a.severity != "info"]
    # twenty logging steps of NaN: each symptom raised once, warned once
    assert len(keys) == len(set(keys))
    assert len(ours) == len(set(keys))
    assert sum(a.code == "non_finite_loss" for a in watch.alerts) == 1


# ---------------------------------------------------------------------- actions
def test_stop_action_stops_cleanly_and_saves_checkpoint(tmp_path):
    alerts = EarlyAlerts(actions={"non_finite_loss": "stop"}, log_every_n_steps=5)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, [alerts, ckpt], max_steps=200, enable_checkpointing=True, log_every_n_steps=5)
    quiet_fit(trainer, nan_model(), data(n=4096), seed=0)
    stop = alerts.stop_alert
    assert stop is not None and stop.code == "non_finite_loss"
    assert trainer.should_stop and trainer.global_step <= stop.step + 2 < 200
    assert trainer.state.status == "finished"
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    # the logger was finalized: the event file is complete and readable
    assert (Path(trainer.log_dir) / "alerts.jsonl").exists()


def test_raise_action_raises_an_exception_carrying_the_alert(tmp_path):
    watch = Watch(alerts=EarlyAlerts(actions={"non_finite_loss": "raise"}))
    trainer = make_trainer(tmp_path, [watch], max_steps=100, logger=False)
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AlertError, match="non_finite_loss") as info:
            trainer.fit(nan_model(), data())
    assert info.value.alert.code == "non_finite_loss" and info.value.alert.severity == "error"
    assert info.value.alert is watch.alerts[-1]


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"actions": {"dead_unit": "stop"}},
            r"`actions` key must be an alert code, got 'dead_unit'\. Valid codes: non_fin",
        ),
        (
            {"actions": {"dead_units": "halt"}},
            r"`actions\['dead_units'\]` must be one of 'warn', 'stop', 'raise', got 'halt'\.",
        ),
        ({"default_action": "log"}, r"`default_action` must be one of 'warn', 'stop', 'raise', got 'log'\."),
        (
            {"settings": {"dead_units": {"threshold": -0.1}}},
            r"`settings\['dead_units'\]\['threshold'\]` must be a non-negative number, got -0\.1\.",
        ),
        (
            {"settings": {"dead_units": {"patience": 0}}},
            r"`settings\['dead_units'\]\['patience'\]` must be a positive integer, got 0\.",
        ),
        (
            {"settings": {"dead_units": {"thresh": 0.5}}},
            r"is not a setting of 'dead_units'; valid settings: threshold, patience\.",
        ),
        ({"settings": {"nope": False}}, r"`settings` key must be an alert code, got 'nope'"),
        ({"rules": [42]}, r"`rules` must be callables"),
    ],
)
def test_bad_configuration_is_an_error_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyAlerts(**kwargs)


def test_watch_rejects_bad_alerts_and_double_use(tmp_path):
    with pytest.raises(ValueError, match=r"`alerts` must be True, False or an EarlyAlerts, got 'yes'\."):
        Watch(alerts="yes")
    shared = EarlyAlerts()
    trainer = make_trainer(tmp_path, [Watch(alerts=shared), shared], max_steps=1, logger=False)
    with pytest.raises(ValueError, match="not both"):
        quiet_fit(trainer, Net(), data(), seed=0)


def test_a_user_rule_runs_each_logging_step_and_raises_once_and_a_disabled_code_never(tmp_path):
    seen = []

    def loss_above(snapshot: Snapshot, context: RuleContext):
        seen.append(snapshot.step)
        if snapshot.get("loss") > 0:
            yield context.alert("loss_positive", snapshot, None, snapshot.get("loss"), 0.0, "Loss > 0.", "None.")

    loss_above.codes = ("loss_positive",)
    alerts = EarlyAlerts(rules=[loss_above], settings={"unshuffled_data": False}, actions={"loss_positive": "warn"})
    watch = Watch(alerts=alerts, log_every_n_steps=4)
    trainer = make_trainer(tmp_path, [watch], max_steps=12, logger=False)
    quiet_fit(trainer, Net(), data(shuffle=False), seed=0)
    assert seen == [3, 7, 11]
    assert [a.code for a in watch.alerts if a.code != "unseeded_run"] == ["loss_positive"]  # once, no spam


def test_standalone_early_alerts_builds_its_own_statistics(tmp_path):
    alerts = EarlyAlerts(log_every_n_steps=5)
    trainer = make_trainer(tmp_path, [alerts], max_steps=20, log_every_n_steps=5)
    quiet_fit(trainer, nan_model(), data(), seed=0)
    assert "non_finite_loss" in {a.code for a in alerts.alerts}
    assert "non_finite_gradients" in {a.code for a in alerts.alerts}  # needs the gradient monitor


@pytest.mark.parametrize("alerts_first", [False, True], ids=["monitor-first", "alerts-first"])
def test_standalone_early_alerts_reads_a_standalone_monitor_instead_of_writing_twice(tmp_path, alerts_first):
    def run(name, model, with_alerts=True):
        grads, alerts = GradientNormMonitor(log_every_n_steps=5), EarlyAlerts(log_every_n_steps=5)
        callbacks = ([alerts, grads] if alerts_first else [grads, alerts]) if with_alerts else [grads]
        trainer = make_trainer(tmp_path / name, callbacks, max_steps=20, log_every_n_steps=5)
        quiet_fit(trainer, model, data(), seed=0)
        return trainer, grads, alerts, read_points(tmp_path / name)

    # the same run with the gradient monitor alone: what it writes is the reference
    torch.manual_seed(0)
    _, _, _, alone = run("alone", Net(), with_alerts=False)
    reference = {key: values for key, values in alone.items() if key[0].startswith("watch/")}
    assert reference and all(math.isfinite(v) for values in reference.values() for v in values)

    torch.manual_seed(0)
    trainer, grads, alerts, points = run("both", Net())
    assert {key: len(v) for key, v in points.items() if len(v) > 1} == {}  # each (tag, step) once
    # the gradient points are the standalone monitor's, unchanged
    assert {key for key in points if "/grad_" in key[0]} == set(reference)
    assert all(points[key] == values for key, values in reference.items())
    # the families nobody else measures are still written by the alerts' own statistics
    assert ("watch/update_ratio/net.0", 4) in points and ("watch/global/loss", 4) in points
    # the rules saw the monitor's gradients in the same snapshot as the rest of the step
    # 16 batches, a write every 5 steps, then the final (partial) window at the end of fit
    assert [s.step for s in alerts.engine.history] == [4, 9, 14, 15]
    assert alerts.engine.history[-1].final and grads.last_snapshot.step == 15
    last = alerts.engine.history[-2]
    written = {k[0].rsplit("/", 1)[1]: v[0] for k, v in reference.items() if k[1] == 14 and "/grad_norm/" in k[0]}
    assert written and last.modules("grad_norm") == pytest.approx(written, rel=1e-6)  # float32 in the event file
    assert last.modules("update_ratio") and math.isfinite(last.get("loss"))
    assert StatHub.for_trainer(trainer).members == []  # every member left the hub at the end of fit

    # and alert on them: NaN gradients are only measured by the user's monitor here
    _, grads, alerts, points = run("nan", nan_model())
    assert {key: len(v) for key, v in points.items() if len(v) > 1} == {}
    assert "non_finite_gradients" in {a.code for a in alerts.alerts}


# ---------------------------------------------------------------------- resume
def test_state_dict_round_trip_resumes_without_duplicates(tmp_path):
    watch = Watch(log_every_n_steps=5)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, [watch, ckpt], max_epochs=1, logger=False, enable_checkpointing=True)
    quiet_fit(trainer, Net(), data(shuffle=False), seed=0)
    before = [a.to_dict() for a in watch.alerts]
    assert "unshuffled_data" in {a["code"] for a in before}
    state = watch.state_dict()["EarlyAlerts"]
    assert json.loads(json.dumps(state))  # plain, JSON-able

    resumed = Watch(log_every_n_steps=5)
    trainer = make_trainer(tmp_path, [resumed, ckpt], max_epochs=2, logger=False, enable_checkpointing=True)
    quiet_fit(trainer, Net(), data(shuffle=False), seed=0, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    after = [a.to_dict() for a in resumed.alerts]
    assert after[: len(before)] == before  # restored
    keys = [(a["code"], a["module"]) for a in after]
    assert len(keys) == len(set(keys))  # the fit-start checks did not raise again
    # the rules' history continues where it stopped: 3 restored + 3 new snapshots + the final window
    assert [s.step for s in resumed.early_alerts.engine.history] == [4, 9, 14, 19, 24, 29, 31]


# ---------------------------------------------------------------------- DDP
def _rank_one_rule(snapshot, context):
    if torch.distributed.get_rank() == 1 and snapshot.step >= 3:
        yield context.alert("rank_local", snapshot, None, 1.0, 0.0, "Only rank 1 sees this.", "None.")


_rank_one_rule.codes = ("rank_local",)


def _ddp_worker(rank: int, out: str, port: int) -> None:
    join_two_process_group(rank, port)
    try:
        results = {}
        # a finding on one rank only: the stop is agreed, so both ranks stop at the same step
        watch = Watch(alerts=EarlyAlerts(rules=[_rank_one_rule], actions={"rank_local": "stop"}), log_every_n_steps=2)
        trainer = make_trainer(Path(out) / "rank", [watch], strategy="ddp", devices=2, max_steps=50, logger=False)
        quiet_fit(trainer, Net(), data(n=1024), seed=0)
        results["local"] = (trainer.global_step, trainer.should_stop, [a.code for a in watch.alerts])
        # a pathology every rank sees: NaN loss, stop agreed
        watch = Watch(alerts=EarlyAlerts(actions={"non_finite_loss": "stop"}), log_every_n_steps=2)
        trainer = make_trainer(Path(out) / "nan", [watch], strategy="ddp", devices=2, max_steps=50, log_every_n_steps=2)
        quiet_fit(trainer, nan_model(), data(n=1024), seed=0)
        results["nan"] = (trainer.global_step, trainer.should_stop, [a.code for a in watch.alerts])
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_agree_on_stop(tmp_path):
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path), find_free_network_port()), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # rank-local finding: both ranks stopped at the same step, well before max_steps
    assert r0["local"][0] == r1["local"][0] < 50 and r0["local"][1] and r1["local"][1]
    assert "rank_local" in r1["local"][2] and "rank_local" not in r0["local"][2]
    # shared pathology: both stop at the same step
    assert r0["nan"][0] == r1["nan"][0] < 50 and r0["nan"][1] and r1["nan"][1]
    assert "non_finite_loss" in r0["nan"][2]
    lines = [json.loads(x) for x in next((tmp_path / "nan").rglob("alerts.jsonl")).read_text().splitlines()]
    assert sum(r["code"] == "non_finite_loss" for r in lines) == 1  # written once, by rank zero


# ---------------------------------------------------------------------- one-time checks
