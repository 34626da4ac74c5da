"""Watch: one callback running every monitor family, against the monitors run alone."""

from __future__ import annotations

import copy

import torch
from helpers import TinyRegressor, make_trainer, read_scalars, regression_loader

from lightning_watch import ActivationScaleMonitor, DeadUnitMonitor, GradientNormMonitor, ParameterDeltaMonitor, Watch


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
