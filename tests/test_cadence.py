"""When monitors measure and write: the Trainer's interval, the cost floors, and what a fit writes."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import TinyRegressor, make_trainer, read_scalars, regression_loader

from lightning_watch import ActivityRegularizer, GradientNormMonitor, Watch
from lightning_watch.cadence import MIN_DEFAULT_SAMPLE_INTERVAL, MIN_INHERITED_LOG_INTERVAL, Cadence


def trainer_with(log_every: int, fast_dev_run: bool = False) -> SimpleNamespace:
    return SimpleNamespace(log_every_n_steps=log_every, fast_dev_run=fast_dev_run)


@pytest.mark.parametrize(
    ("trainer_every", "given", "expected_log", "raised"),
    [
        (50, None, 50, None),  # Lightning's default is followed as it is
        (25, None, 25, None),
        (1, None, MIN_INHERITED_LOG_INTERVAL, 1),  # per-step loss curves do not make per-layer stats per step
        (5, None, MIN_INHERITED_LOG_INTERVAL, 5),
        (1, 1, 1, None),  # asked of the callback itself: honoured
        (50, 3, 3, None),
    ],
)
def test_log_interval_follows_the_trainer_above_the_floor(trainer_every, given, expected_log, raised):
    cadence = Cadence.resolve(trainer_with(trainer_every), given, None)
    assert cadence.log == expected_log
    assert cadence.raised_from == raised
    assert (cadence.floor_notice("Watch") is not None) == (raised is not None)


@pytest.mark.parametrize(
    ("log", "expected_sample"),
    [
        (50, 10),
        (100, 20),
        (25, 5),
        (20, MIN_DEFAULT_SAMPLE_INTERVAL),
        (10, MIN_DEFAULT_SAMPLE_INTERVAL),
        (4, 4),
        (1, 1),
    ],
)
def test_default_sampling_is_five_per_window_but_at_most_one_batch_in_five(log, expected_sample):
    cadence = Cadence.resolve(trainer_with(50), log, None)
    assert cadence.sample == expected_sample
    sampled = [s for s in range(10 * log) if cadence.is_sample_step(s)]
    # the logging step is always among the sampled ones, and no window samples more than 1 in 5
    assert all(cadence.is_sample_step(s) for s in range(log - 1, 10 * log, log))
    assert len(sampled) <= max(10, 10 * log // MIN_DEFAULT_SAMPLE_INTERVAL)


def test_explicit_sampling_and_fast_dev_run_are_honoured():
    assert Cadence.resolve(trainer_with(50), 10, 1).sample == 1
    dev = Cadence.resolve(trainer_with(1, fast_dev_run=True), None, None)
    assert (dev.log, dev.sample, dev.raised_from) == (1, 1, None)


def test_a_fit_at_log_every_1_writes_every_10_steps_and_says_why(tmp_path, caplog):
    torch.manual_seed(0)
    watch = Watch(alerts=False, report=False, pictures=False)
    regularizer = ActivityRegularizer({"net.0": {"l2": 1e-4}})
    trainer = make_trainer(tmp_path, [watch, regularizer], max_steps=20, max_epochs=None, log_every_n_steps=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(TinyRegressor(), regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert [s for s, _ in scalars["watch/grad_norm/net.0"]] == [9, 19]
    # the penalty is a scalar the loss step computes anyway: it follows the Trainer exactly
    penalty = next(tag for tag in scalars if "activity" in tag)
    assert [s for s, _ in scalars[penalty]] == list(range(20))
    notices = [r.getMessage() for r in caplog.records if "log_every_n_steps=1" in r.getMessage()]
    assert len(notices) == 1 and "every 10 steps" in notices[0], notices


def test_the_callbacks_own_interval_needs_no_notice(tmp_path, caplog):
    torch.manual_seed(0)
    monitor = GradientNormMonitor(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=3, max_epochs=None, log_every_n_steps=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(TinyRegressor(), regression_loader())
    assert [s for s, _ in read_scalars(trainer.logger.log_dir)["watch/grad_norm/net.0"]] == [0, 1, 2]
    assert not [r for r in caplog.records if "writes its statistics every" in r.getMessage()]
