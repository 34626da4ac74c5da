"""Lightning calls only the hooks our callbacks have work in (lightning_watch/subscription.py).

The calls are counted with a Lightning profiler: Lightning opens one profiler region per callback
hook it calls, named ``[Callback]<state_key>.<hook>``, so the count is Lightning's own.
"""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as pl
import pytest
from helpers import TinyRegressor, make_trainer, quiet_fit, read_points, regression_loader
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer import call

from lightning_watch import EarlyAlerts, GradientNormMonitor, Watch, subscription
from lightning_watch.subscription import PER_BATCH_HOOKS, HookSubscription, dispatcher_skips_none

STEPS = 40


class CountingProfiler(PassThroughProfiler):
    """Counts the callback hooks Lightning calls: ``calls[(callback class, hook)]``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str]] = Counter()

    def start(self, action_name: str) -> None:
        if action_name.startswith("[Callback]"):
            key, hook = action_name[len("[Callback]") :].rsplit(".", 1)
            self.calls[(key.split("{")[0], hook)] += 1


def fit_counted(tmp_path, callback, steps: int = STEPS, **trainer_kwargs):
    profiler = CountingProfiler()
    trainer = make_trainer(
        tmp_path,
        [callback],
        max_steps=steps,
        max_epochs=None,
        log_every_n_steps=10,
        profiler=profiler,
        **trainer_kwargs,
    )
    pl.seed_everything(0, verbose=False)  # before the model: its initial weights too
    quiet_fit(trainer, TinyRegressor(), regression_loader(n=320))
    return profiler.calls, trainer


def busy_batches(calls: Counter, name: str) -> int:
    return calls[(name, "on_train_batch_start")]


def test_lightning_skips_a_hook_shadowed_by_none():
    assert dispatcher_skips_none()  # the installed Lightning: the fast path is on in this suite


def test_a_dispatcher_that_would_call_none_turns_shadowing_off(monkeypatch):
    def calls_everything(trainer, hook_name, *args, **kwargs):
        for callback in trainer.callbacks:
            getattr(callback, hook_name)(trainer, trainer.lightning_module, *args, **kwargs)

    monkeypatch.setattr(call, "_call_callback_hooks", calls_everything)
    dispatcher_skips_none.cache_clear()
    try:
        assert not dispatcher_skips_none()
        callback = Callback()
        HookSubscription(callback).only()
        assert "on_after_backward" not in vars(callback)  # nothing shadowed
    finally:
        dispatcher_skips_none.cache_clear()


def test_watch_is_called_only_at_batch_end_on_quiet_batches(tmp_path):
    calls, _ = fit_counted(tmp_path, Watch(pictures=False, report=False))
    assert calls[("Watch", "on_train_batch_end")] == STEPS
    busy = busy_batches(calls, "Watch")
    # a logging step every 10 (sampled, with its neighbours that arm and judge), never every batch
    assert STEPS // 10 <= busy < STEPS // 2
    assert calls[("Watch", "on_before_optimizer_step")] == busy
    assert calls[("Watch", "on_before_backward")] == busy
    # hooks Watch does not define are never called
    assert calls[("Watch", "on_after_backward")] == calls[("Watch", "on_before_zero_grad")] == 0


def test_standalone_monitor_and_alerts_skip_their_quiet_batches_too(tmp_path):
    calls, _ = fit_counted(tmp_path / "monitor", GradientNormMonitor())
    assert calls[("GradientNormMonitor", "on_train_batch_end")] == STEPS
    assert busy_batches(calls, "GradientNormMonitor") < STEPS // 2
    assert calls[("GradientNormMonitor", "on_after_backward")] == 0
    calls, _ = fit_counted(tmp_path / "alerts", EarlyAlerts())
    assert calls[("EarlyAlerts", "on_train_batch_end")] == STEPS
    assert busy_batches(calls, "EarlyAlerts") < STEPS // 2


def test_a_subclass_hook_is_still_called_on_every_batch(tmp_path):
    class MyWatch(Watch):
        def on_after_backward(self, trainer, pl_module):
            self.seen = getattr(self, "seen", 0) + 1

    watch = MyWatch(pictures=False, report=False)
    fit_counted(tmp_path, watch)
    assert watch.seen == STEPS


@pytest.mark.parametrize("accumulate", [1, 3])
def test_skipping_hooks_changes_no_logged_value(tmp_path, monkeypatch, accumulate):
    def logged(folder, skips: bool):
        monkeypatch.setattr(subscription, "dispatcher_skips_none", lambda: skips)
        _, trainer = fit_counted(folder, Watch(pictures=False, report=False), accumulate_grad_batches=accumulate)
        return read_points(trainer.log_dir)

    fast, slow = logged(tmp_path / "fast", True), logged(tmp_path / "slow", False)
    # every statistic but the measured time share (lightning_watch/pace.py), a clock reading
    watched = {key for key in slow if key[0].startswith("watch/") and key[0] != "watch/global/watch_overhead"}
    assert len(watched) > 20  # per-layer statistics at several steps
    assert {key: fast[key] for key in watched} == {key: slow[key] for key in watched}
    assert {key for key in fast if key[0].startswith("watch/") and key[0] != "watch/global/watch_overhead"} == watched


def test_no_hook_stays_shadowed_after_a_fit_or_a_crash(tmp_path):
    watch = Watch(pictures=False, report=False)
    fit_counted(tmp_path / "fit", watch)
    assert not set(vars(watch)) & set(PER_BATCH_HOOKS)

    class Crash(TinyRegressor):
        def training_step(self, batch, batch_idx):
            if batch_idx == 7:  # a quiet batch: Watch's hooks are narrowed
                raise RuntimeError("user bug")
            return super().training_step(batch, batch_idx)

    watch = Watch(pictures=False, report=False)
    trainer = make_trainer(tmp_path / "crash", [watch], max_steps=STEPS, max_epochs=None, log_every_n_steps=10)
    with pytest.raises(RuntimeError, match="user bug"):
        quiet_fit(trainer, Crash(), regression_loader(n=320), seed=0)
    assert not set(vars(watch)) & set(PER_BATCH_HOOKS)
    assert callable(watch.on_train_batch_start) and callable(watch.on_after_backward)


def test_a_second_fit_with_the_same_watch_is_called_like_the_first(tmp_path):
    watch = Watch(pictures=False, report=False)
    first, _ = fit_counted(tmp_path / "first", watch, steps=15)  # ends narrowed: step 14 is quiet
    second, _ = fit_counted(tmp_path / "second", watch, steps=15)
    assert {k: v for k, v in second.items() if k[0] == "Watch"} == {k: v for k, v in first.items() if k[0] == "Watch"}
