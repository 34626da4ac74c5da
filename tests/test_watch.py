"""Watch: one callback running every monitor family, against the monitors run alone."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyRegressor, make_trainer, read_points, read_scalars, regression_loader

from lightning_watch import (
    ActivationScaleMonitor,
    DeadUnitMonitor,
    EarlyAlerts,
    GradientNormMonitor,
    ParameterDeltaMonitor,
    Watch,
    WatchWarning,
)


def test_watch_logs_exactly_what_the_four_monitors_log_alone(tmp_path):
    """Watch shares hooks and one read, but must log exactly what each monitor logs alone."""
    torch.manual_seed(0)
    model = TinyRegressor()
    every = {"log_every_n_steps": 2, "sample_every_n_steps": 1}
    alone = [
        GradientNormMonitor(**every),
        ParameterDeltaMonitor(**every),
        ActivationScaleMonitor(**every),
        DeadUnitMonitor(**every),
    ]
    model_b = copy.deepcopy(model)
    ta = make_trainer(tmp_path / "a", alone, max_steps=4, log_every_n_steps=2)
    ta.fit(model, regression_loader())
    tb = make_trainer(tmp_path / "b", [Watch(alerts=False, **every)], max_steps=4, log_every_n_steps=2)
    tb.fit(model_b, regression_loader())
    a, b = read_scalars(ta.logger.log_dir), read_scalars(tb.logger.log_dir)
    watch_tags = {t for t in a if t.startswith("watch/")}
    assert watch_tags == {t for t in b if t.startswith("watch/")}
    for tag in watch_tags:
        assert a[tag] == b[tag], tag


def test_the_progress_bar_shows_the_number_of_warnings_and_errors_raised(tmp_path):
    torch.manual_seed(0)
    watch = Watch(log_every_n_steps=2, report=False, pictures=False)  # the unshuffled loader is a warning
    trainer = make_trainer(tmp_path, [watch], max_steps=6, enable_progress_bar=True)
    trainer.fit(TinyRegressor(), regression_loader())
    raised = [a for a in watch.alerts if a.severity != "info"]
    assert raised and trainer.progress_bar_metrics["watch_warnings"] == len(raised)
    assert "watch_warnings" not in trainer.callback_metrics or "watch_warnings" not in read_scalars(trainer.log_dir)


def test_early_alerts_next_to_a_watch_with_alerts_warns_and_writes_nothing_twice(tmp_path):
    watch, extra = Watch(log_every_n_steps=2), EarlyAlerts()
    trainer = make_trainer(tmp_path, [watch, extra], max_steps=6)
    with pytest.warns(WatchWarning, match="every alert would be raised twice"):
        trainer.fit(TinyRegressor(), regression_loader())
    points = read_points(trainer.log_dir)
    assert points and {key: len(v) for key, v in points.items() if len(v) > 1} == {}  # each (tag, step) once
    assert extra.alerts == [] and watch.alerts
