"""What the writers put in the loggers: histograms, the custom-scalar layout, the same scalars in every logger."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyRegressor, make_trainer, read_scalars, regression_loader

from lightning_watch import Watch


def test_histograms_and_custom_scalar_layout_are_in_the_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2, histogram_every_n_steps=2)], max_steps=4)
    trainer.fit(TinyRegressor(), regression_loader())
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0, "tensors": 0})
    acc.Reload()
    histograms = set(acc.Tags()["histograms"])
    expected = {"watch_hist/weight/net.0.weight", "watch_hist/grad/net.0.weight", "watch_hist/activation/net.1"}
    assert expected <= histograms
    weights = acc.Histograms("watch_hist/weight/net.0.weight")
    assert [h.step for h in weights] == [1, 3]
    assert weights[0].histogram_value.num == 8 * 4
    layout_events = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(layout_events[-1].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
    assert charts["grad_norm"] == [r"^watch\.grad_norm/"]
    assert charts["dead_frac"] == [r"^watch\.dead_frac/"]
    assert charts["global/grad_norm"] == [r"^watch\.global/grad_norm$"]


def test_csv_logger_and_several_loggers_get_the_same_scalars(tmp_path):
    import csv

    torch.manual_seed(0)
    loggers = [pl.loggers.CSVLogger(str(tmp_path), name="csv"), pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")]
    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2)], max_steps=4, logger=loggers)
    trainer.fit(TinyRegressor(), regression_loader())
    tb = read_scalars(loggers[1].log_dir, raw=True)
    with open(f"{loggers[0].log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    csv_tags = {k for row in rows for k, v in row.items() if k.startswith("watch.") and v != ""}
    assert csv_tags == {t for t in tb if t.startswith("watch.")}
    row = next(r for r in rows if r["watch.grad_norm/01.net.0"])
    assert float(row["watch.grad_norm/01.net.0"]) == pytest.approx(tb["watch.grad_norm/01.net.0"][0][1], rel=1e-6)
