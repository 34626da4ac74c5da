"""The time budget: Watch()'s default cadence stretches when its statistics cost too much of the run.

The estimator is checked against closed forms with a known clock; the fits check that a tiny model
(whose statistics cost far more than 2 % of its ~1 ms step) gets the stretch, said once, that
explicit intervals and ``budget=None`` keep theirs, and that a resumed fit keeps its stretch.
"""

from __future__ import annotations

import itertools
import logging

import pytest
from helpers import TinyRegressor, make_trainer, quiet_fit, read_scalars, regression_loader

from lightning_watch import Watch
from lightning_watch.cadence import Cadence
from lightning_watch.pace import FULL_WINDOWS, MIN_QUIET, MOST_STRETCH, Pace, check_budget

pytestmark = pytest.mark.pace


def clocked(pace: Pace, quiet: float, busy: list[float], steps: int, start: float = 0.0) -> float:
    """Drive ``pace`` through one window: quiet batches of ``quiet`` s, then busy ones; returns the clock."""
    now = start + (steps - len(busy)) * quiet
    pace.quiet_end(now)
    for seconds in busy:
        now += seconds
        pace.busy_end(now)
    return now


def test_the_share_is_the_busy_batches_excess_over_the_mean_quiet_batch():
    pace = Pace([Cadence(log=50, sample=10, stretchable=True)], budget=0.02)
    pace.open_window(0.0, step=0)
    end = clocked(pace, quiet=0.002, busy=[0.005, 0.005, 0.012], steps=50)
    pace.measure(step=50)
    spent = (0.005 - 0.002) * 2 + (0.012 - 0.002)
    assert pace.share == pytest.approx(spent / end)


def test_a_window_with_too_few_quiet_batches_or_no_timed_batch_has_no_share():
    pace = Pace([Cadence(log=10, sample=5, stretchable=True)])
    pace.open_window(0.0, step=0)
    clocked(pace, quiet=0.002, busy=[0.01] * 3, steps=MIN_QUIET + 2)  # MIN_QUIET - 1 quiet batches
    pace.measure(step=MIN_QUIET + 2)
    assert pace.share is None
    pace.open_window(0.0, step=0)
    pace.gap()  # validation ran: nothing is timed until a quiet batch ends again
    pace.busy_end(0.5)
    pace.measure(step=50)
    assert pace.share is None


@pytest.mark.parametrize(("share", "factor"), [(0.019, 1), (0.03, 2), (0.05, 4), (0.07, 4), (0.5, MOST_STRETCH)])
def test_the_stretch_is_the_power_of_two_that_brings_the_share_under_budget_at_most_eight(share, factor):
    cadence = Cadence(log=50, sample=10, stretchable=True)
    pace = Pace([cadence], budget=0.02, full_windows=1)
    pace.decide(share)
    assert pace.factor == factor
    assert (cadence.log, cadence.sample) == (50 * factor, 10 * factor)


def test_the_cadence_never_shortens_again_and_explicit_intervals_never_stretch():
    default, explicit = Cadence(log=50, sample=10, stretchable=True), Cadence(log=50, sample=10)
    pace = Pace([default, explicit], budget=0.02, full_windows=1)
    pace.decide(0.05)
    pace.decide(0.001)  # cheaper after the stretch: stays stretched
    assert (default.log, explicit.log) == (200, 50)
    assert Pace([Cadence(log=50, sample=10, stretchable=True)], budget=None, full_windows=1).decide(0.9) is None


def test_the_first_windows_keep_the_resolved_cadence_whatever_they_cost():
    cadence = Cadence(log=50, sample=10, stretchable=True)
    pace = Pace([cadence], budget=0.02)
    decisions = [pace.decide(0.5) for _ in range(FULL_WINDOWS)]
    assert decisions == [None] * (FULL_WINDOWS - 1) + [MOST_STRETCH]


@pytest.mark.parametrize("budget", [0, 1, -0.1, True, "2%"])
def test_a_budget_outside_zero_to_one_is_refused_naming_it(budget):
    with pytest.raises(ValueError, match=r"`budget` must be a share"):
        Watch(budget=budget)
    assert check_budget(None) is None and check_budget(0.05) == 0.05


def fit(tmp_path, watch: Watch, steps: int = 200, **kwargs):
    trainer = make_trainer(tmp_path, [watch], max_steps=steps, max_epochs=None, log_every_n_steps=1, **kwargs)
    quiet_fit(trainer, TinyRegressor(), regression_loader(n=3200), seed=0)
    logged = read_scalars(trainer.log_dir)
    return [step for step, _ in logged["watch/global/loss"]], logged


def test_a_tiny_model_over_budget_writes_less_often_and_says_so_once(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        steps, logged = fit(tmp_path, Watch(pictures=False, report=False))
    notices = [r.getMessage() for r in caplog.records if "now writes its statistics every" in r.getMessage()]
    assert len(notices) == 1 and "`log_every_n_steps=10`" in notices[0]
    # the first windows at the resolved cadence, then longer ones (the last point is the end-of-fit read)
    assert steps[:FULL_WINDOWS] == [9, 19, 29, 39]
    gaps = {b - a for a, b in itertools.pairwise(steps[:-1])}
    assert max(gaps) > 10 and max(gaps) <= 10 * MOST_STRETCH
    overhead = [value for _, value in logged["watch/global/watch_overhead"]]
    assert overhead[0] > 0.02  # the first window's share, over the budget: why it stretched


def test_explicit_intervals_and_budget_none_keep_their_cadence_and_still_report_the_overhead(tmp_path):
    explicit, _ = fit(tmp_path / "explicit", Watch(log_every_n_steps=10, pictures=False, report=False), steps=100)
    unbudgeted, logged = fit(tmp_path / "none", Watch(budget=None, pictures=False, report=False), steps=100)
    assert explicit == unbudgeted == list(range(9, 100, 10))
    assert all(0 < value < 1 for _, value in logged["watch/global/watch_overhead"])


def test_a_resumed_fit_keeps_the_stretch_of_its_checkpoint(tmp_path):
    first = Watch(pictures=False, report=False)
    fit(tmp_path / "first", first)
    state = first.state_dict()
    assert state["Pace"]["factor"] > 1
    resumed = Watch(budget=None, pictures=False, report=False)  # no new stretch: only the checkpoint's
    resumed.load_state_dict(state)
    steps, _ = fit(tmp_path / "resumed", resumed, steps=100)
    assert steps[0] == 10 * state["Pace"]["factor"] - 1  # stretched from its first window
