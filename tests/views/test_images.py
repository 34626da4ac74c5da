"""TensorBoard pictures: heat maps and gradient flow written as images; optional matplotlib."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import TinyRegressor, make_trainer, read_scalars, regression_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_watch import Watch
from lightning_watch.views.history import History
from lightning_watch.views.images import IMAGE_TAGS, grad_flow, heatmap
from lightning_watch.warn import WatchWarning


def _images(log_dir):
    acc = EventAccumulator(log_dir, size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def _fit(tmp_path, steps=12, **watch_kwargs):
    torch.manual_seed(0)
    budget = watch_kwargs.pop("picture_budget", None)
    watch = Watch(alerts=False, report=False, **{"log_every_n_steps": 1, **watch_kwargs})
    if budget is not None:
        watch.views.picture_budget = budget
    trainer = make_trainer(tmp_path, [watch], max_steps=steps, max_epochs=None)
    trainer.fit(TinyRegressor(), regression_loader())
    return watch, trainer


def test_pictures_written_at_coarse_interval_and_at_end(tmp_path):
    watch, trainer = _fit(tmp_path, picture_budget=1e9)  # a short run: lift the time budget
    images = _images(trainer.log_dir)
    assert set(images) == set(IMAGE_TAGS.values())
    every = watch.views.picture_every
    last = trainer.global_step - 1
    expected = sorted({s for s in range(last + 1) if (s + 1) % every == 0} | {last})  # publication n at step n-1
    for events in images.values():
        assert [e.step for e in events] == expected
        assert events[-1].width > 100 and events[-1].height > 50


def test_heatmap_history_matches_logged_values(tmp_path):
    watch, trainer = _fit(tmp_path, pictures=False)
    assert not _images(trainer.log_dir)  # pictures=False draws nothing
    scalars = read_scalars(trainer.log_dir)
    modules, steps, values = watch.views.history.matrix("dead_frac")
    for module, row in zip(modules, values):
        logged = dict(scalars[f"watch/dead_frac/{module}"])
        assert [logged[s] for s in steps] == pytest.approx(row, rel=1e-6)


def test_heatmap_colours_follow_values():
    history = History()
    for step in range(4):
        history.add("dead_frac", "alive", step, 0.0)
        history.add("dead_frac", "dead", step, 1.0)
    image = heatmap(history, "dead_frac")
    assert image.dtype == np.uint8 and image.shape[2] == 3
    # the two rows use the two ends of the colour map: the picture holds both extremes' colours
    colours = {tuple(int(v) for v in c) for c in image.reshape(-1, 3)}
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    for end in (0.0, 1.0):
        rgb = tuple(round(255 * c) for c in cmap(end)[:3])
        assert any(max(abs(a - b) for a, b in zip(rgb, c)) <= 2 for c in colours)


def test_empty_history_draws_nothing():
    assert heatmap(History(), "dead_frac") is None and grad_flow(History()) is None


def test_without_matplotlib_one_warning_and_everything_else_works(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.warns(WatchWarning, match="pictures need matplotlib") as record:
        watch, trainer = _fit(tmp_path)
    assert sum("matplotlib" in str(w.message) for w in record) == 1
    assert not _images(trainer.log_dir)
    assert "watch/grad_norm/net.0" in read_scalars(trainer.log_dir)
    assert watch.views.last_report is not None and watch.views.last_report.rows


def test_periodic_pictures_stay_within_their_time_budget(monkeypatch):
    import time

    from lightning_watch.snapshot import Snapshot
    from lightning_watch.views.live import WatchViews

    clock = [0.0]  # seconds since the fit started: one per training window, plus drawing time
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    views = WatchViews(report=False, picture_every=1, picture_budget=0.01)
    views.reset()
    drawn = []

    def slow_draw(trainer, step):
        drawn.append(step)
        clock[0] += 0.25  # as if matplotlib took 0.25 s

    monkeypatch.setattr(views, "_draw", slow_draw)
    for step in range(200):
        clock[0] += 1.0
        views.on_snapshot(None, None, Snapshot(step=step, epoch=0))
        assert views._drawing <= 0.01 * clock[0]  # never over budget, not even after the first draw
    # the first draw waits for 100x its estimated cost (0.3 s of drawing: 30 s of training), and the
    # budget is then used, not hoarded: about 1 % of 200 s is 2 s, eight draws of 0.25 s
    assert drawn[0] == 29 and len(drawn) == 8, drawn
