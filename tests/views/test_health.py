"""End-of-fit health report: values equal the logged scalars, files/TensorBoard text, printing rules."""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import pytest
import torch
from helpers import TinyRegressor, make_trainer, read_scalars, regression_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_watch import EarlyAlerts, Watch
from lightning_watch.snapshot import Snapshot
from lightning_watch.views import HealthReport, History
from lightning_watch.views.live import HEALTH_JSON, HEALTH_MD, REPORT_TAG, WatchViews


def _fit(tmp_path, model=None, epochs=3, **watch_kwargs):
    torch.manual_seed(0)
    watch = Watch(pictures=False, **{"log_every_n_steps": 1, **watch_kwargs})
    trainer = make_trainer(tmp_path, [watch], max_epochs=epochs)
    trainer.fit(model or TinyRegressor(), regression_loader())
    return watch, trainer


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("healthy"), report=False)


@pytest.fixture(scope="module")
def dead_run(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyRegressor()
    model.net[0].bias.data.fill_(-10.0)  # every ReLU input is negative: net.1 is dead from step 0
    return _fit(
        tmp_path_factory.mktemp("dead"),
        model,
        epochs=5,
        report=False,
        alerts=EarlyAlerts(actions={"dead_units": "stop"}),
    )


def test_report_values_equal_logged_scalars(healthy_run):
    _, trainer = healthy_run
    scalars = read_scalars(trainer.log_dir)  # TensorBoard's own reader, not ours
    report = json.loads(Path(trainer.log_dir, HEALTH_JSON).read_text())
    # forward order; the ReLU (net.1) joins the Linear that feeds it
    assert [row["layer"] for row in report["layers"]] == ["net.0", "net.2"]
    assert [row["modules"] for row in report["layers"]] == [["net.0", "net.1"], ["net.2"]]
    assert [row["types"] for row in report["layers"]] == [["Linear", "ReLU"], ["Linear"]]
    assert report["run"] == trainer.log_dir and report["checked"] is True
    for row in report["layers"]:
        for metric in ("grad_norm", "update_ratio", "act_rms", "dead_frac"):
            # the layer's own figure first; the dead fraction is the activation's
            modules = row["modules"][::-1] if metric == "dead_frac" else row["modules"]
            series = next((scalars[t] for m in modules if (t := f"watch/{metric}/{m}") in scalars), None)
            if series is None:
                assert row[metric] is None
                continue
            steps, values = zip(*sorted(series))
            assert row[metric] == pytest.approx(values[-1], rel=1e-6)
            assert row["last_step"] == steps[-1] == trainer.global_step - 1
        if row["grad_norm"] is not None:
            assert row["grad_norm_max"] == pytest.approx(max(v for _, v in scalars[f"watch/grad_norm/{row['layer']}"]))
    assert report["last_step"] == trainer.global_step - 1


def test_report_files_and_tensorboard_text(healthy_run):
    watch, trainer = healthy_run
    markdown = Path(trainer.log_dir, HEALTH_MD).read_text()
    assert "| layer |" in markdown and "`net.0` (Linear → ReLU)" in markdown
    acc = EventAccumulator(trainer.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    tag = f"{REPORT_TAG}/text_summary"
    assert tag in acc.Tags()["tensors"]
    text = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    assert text.strip() == markdown.strip()
    assert watch.views.last_report.to_markdown() == markdown.strip()


def test_stopped_by_alert_report_lists_alerts_with_hints(dead_run):
    watch, trainer = dead_run
    assert trainer.global_step < 5 * 4  # the stop action ended fit early
    report = json.loads(Path(trainer.log_dir, HEALTH_JSON).read_text())
    dead_alerts = [a for a in report["alerts"] if a["code"] == "dead_units"]
    assert dead_alerts and all(a["hint"] for a in dead_alerts)
    # the jsonl written by the alerts sink and the report agree record for record
    lines = [json.loads(x) for x in Path(trainer.log_dir, "alerts.jsonl").read_text().splitlines()]
    assert report["alerts"] == lines
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows["net.0"]["modules"] == ["net.0", "net.1"]  # the dead ReLU is shown on its Linear's row
    assert rows["net.0"]["dead_frac"] == 1.0
    flagged = {a["module"]: a["severity"] for a in dead_alerts}
    assert rows["net.0"]["status"] == flagged["net.1"]
    assert report["healthy"] is False
    text = watch.views.last_report.to_text()
    assert "SICK" in text and "hint: " in text and "dead_units in net.1" in text
    assert "net.0 (Linear → ReLU)" in text


@pytest.mark.parametrize(
    ("report", "progress_bar", "printed"), [(None, False, False), (True, False, True), (False, True, False)]
)
def test_printing_follows_report_and_progress_bar(tmp_path, capsys, report, progress_bar, printed):
    torch.manual_seed(0)
    trainer = make_trainer(
        tmp_path,
        [Watch(report=report, pictures=False, alerts=False, log_every_n_steps=1)],
        max_steps=2,
        enable_progress_bar=progress_bar,
    )
    trainer.fit(TinyRegressor(), regression_loader())
    out = capsys.readouterr().out
    assert ("lightning_watch health report" in out) is printed
    assert os.path.exists(os.path.join(trainer.log_dir, HEALTH_JSON))  # files are written either way


def test_progress_bar_default_prints(tmp_path, capsys):
    torch.manual_seed(0)
    trainer = make_trainer(
        tmp_path, [Watch(pictures=False, alerts=False, log_every_n_steps=1)], max_steps=2, enable_progress_bar=True
    )
    trainer.fit(TinyRegressor(), regression_loader())
    assert "lightning_watch health report" in capsys.readouterr().out


def test_only_rank_zero_writes(tmp_path):
    views = WatchViews(report=True, pictures=False)
    snap = Snapshot(step=3, epoch=0)
    snap.put("grad_norm", 1.0, module="fc")
    views.history.add_snapshot(snap)
    trainer = types.SimpleNamespace(
        log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=False, loggers=[object()]
    )
    views.on_train_end(trainer, None, [])
    assert os.listdir(tmp_path) == []
    assert views.last_report.rows[0].grad_norm == 1.0


def test_history_is_bounded_and_summary_covers_whole_run():
    history = History(maxlen=16)
    for step in range(1000):
        snap = Snapshot(step=step, epoch=0)
        snap.put("grad_norm", float(step % 97), module="fc")
        history.add_snapshot(snap)
    track = history.track("grad_norm", "fc")
    assert len(track.points) == 16 and track.points[0][0] == 1000 - 16
    assert track.max == 96.0 and track.count == 1000 and track.last == float(999 % 97)


def test_nonfinite_values_mark_the_layer_and_json_stays_valid():
    history = History()
    history.add("grad_norm", "fc", 0, 1.0)
    history.add("grad_norm", "fc", 1, math.inf)
    report = HealthReport.build(history, [])
    row = report.rows[0]
    assert row.status == "error" and row.nonfinite == 1 and row.grad_norm_max == 1.0
    parsed = json.loads(report.to_json())
    assert parsed["layers"][0]["grad_norm"] is None and parsed["healthy"] is False


def test_nothing_logged_is_not_checked_never_healthy():
    report = HealthReport.build(History(), [])
    assert report.checked is False and report.healthy is None
    text = report.to_text()
    assert "healthy" not in text and "Not checked: no logging step was reached" in text
    assert "log_every_n_steps=10" in text
    assert json.loads(report.to_json())["healthy"] is None
    assert "**Not checked" in report.to_markdown() and "No alerts." not in report.to_markdown()


def test_fold_joins_an_activation_to_its_layer_only():
    history = History()
    for module, metric, value in [
        ("fc1", "grad_norm", 1.0), ("fc1", "act_rms", 5.0), ("act1", "act_rms", 2.0), ("act1", "dead_frac", 0.5),
        ("drop", "act_rms", 2.0), ("act2", "dead_frac", 0.25), ("fc2", "grad_norm", 3.0),
    ]:  # fmt: skip
        history.add(metric, module, 0, value)
    types = {"fc1": "Linear", "act1": "ReLU", "drop": "Dropout", "act2": "ReLU", "fc2": "Linear"}
    alerts = [{"code": "dead_units", "severity": "warning", "step": 0, "module": "act1"}]
    rows = HealthReport.build(history, alerts, types=types).rows
    assert [r.label for r in rows] == ["fc1 (Linear → ReLU)", "drop (Dropout → ReLU)", "fc2 (Linear)"]
    assert (rows[0].grad_norm, rows[0].act_rms, rows[0].dead_frac, rows[0].status) == (1.0, 5.0, 0.5, "warning")
    assert [r.layer for r in HealthReport.build(history).rows] == ["fc1", "act1", "drop", "act2", "fc2"]


def test_short_fit_skips_its_end_of_fit_pictures_unless_asked(tmp_path, monkeypatch):
    from lightning_watch.views import images, live

    drawn = []
    real = images.render_pictures
    monkeypatch.setattr(live, "render_pictures", lambda history: drawn.append(history.last_step) or real(history))
    watch = Watch(report=False, alerts=False, log_every_n_steps=2)
    trainer = make_trainer(tmp_path / "default", [watch], max_steps=8)
    trainer.fit(TinyRegressor(), regression_loader(n=128))
    assert drawn == []  # ~0.3 s of matplotlib would be many times this fit's 1 % budget
    report = json.loads(Path(trainer.log_dir, HEALTH_JSON).read_text())
    notes = report["notes"]
    assert any(n.startswith("end-of-fit pictures skipped") and "Watch(final_pictures=True)" in n for n in notes)
    assert report["checked"] is True
    acc = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == []

    watch = Watch(report=False, alerts=False, log_every_n_steps=2)
    watch.views.final_pictures = True
    trainer = make_trainer(tmp_path / "asked", [watch], max_steps=8)
    trainer.fit(TinyRegressor(), regression_loader(n=128))
    assert drawn == [7]
    acc = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert {acc.Images(tag)[-1].step for tag in acc.Tags()["images"]} == {7} and acc.Tags()["images"]
    report = json.loads(Path(trainer.log_dir, HEALTH_JSON).read_text())
    assert not any("pictures" in n for n in report["notes"])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`report` must be True, False or None, got 'yes'\."):
        Watch(report="yes")
    with pytest.raises(ValueError, match=r"`pictures` must be True or False, got 1\."):
        Watch(pictures=1)
    with pytest.raises(ValueError, match=r"`final_pictures` must be True, False or None, got 'yes'\."):
        WatchViews(final_pictures="yes")
    with pytest.raises(ValueError, match=r"`maxlen` must be a positive int, got 0\."):
        History(maxlen=0)


def test_no_logger_writes_no_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # without a logger, Lightning's log_dir is the working directory
    torch.manual_seed(0)
    watch = Watch(report=True, pictures=False, alerts=False, log_every_n_steps=1)
    trainer = make_trainer(tmp_path / "root", [watch], max_steps=2, logger=False)
    trainer.fit(TinyRegressor(), regression_loader())
    assert not list(tmp_path.rglob("health.*"))
    assert "lightning_watch health report" in capsys.readouterr().out
    # fast_dev_run swaps the logger for a DummyLogger (log_dir None): no files either
    trainer = make_trainer(tmp_path / "root", [Watch(report=False, pictures=False, alerts=False)], fast_dev_run=2)
    trainer.fit(TinyRegressor(), regression_loader())
    assert not list(tmp_path.rglob("health.*"))


def test_report_left_when_an_alert_raises(tmp_path):
    from lightning_watch.alerts import AlertError

    torch.manual_seed(0)
    model = TinyRegressor()
    model.net[0].bias.data.fill_(-10.0)
    watch = Watch(
        report=False, pictures=False, alerts=EarlyAlerts(actions={"dead_units": "raise"}), log_every_n_steps=1
    )
    trainer = make_trainer(tmp_path, [watch], max_epochs=3)
    with pytest.raises(AlertError):
        trainer.fit(model, regression_loader())
    report = json.loads(Path(trainer.log_dir, HEALTH_JSON).read_text())
    assert any(a["code"] == "dead_units" for a in report["alerts"])
