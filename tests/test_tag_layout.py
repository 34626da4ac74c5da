"""The tag layout, read back from the event file with TensorBoard's own reader.

One Scalars section per metric (`watch.<metric>/...`), modules numbered in registration order,
the Custom Scalars layout led by the diagnostic charts with no empty chart, and one Text tag per
alert code and module.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import TinyRegressor, make_trainer, read_scalars, regression_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from lightning_watch import Watch
from lightning_watch.snapshot import ModuleOrder, Snapshot, parse_tag, scalar_tag


def _dead_net() -> nn.Sequential:
    # two ReLUs behind very negative biases: both layers die at once, in the same window
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)
        net[2].bias.fill_(-100.0)
    return net


@pytest.fixture(scope="module")
def dead_run(tmp_path_factory):
    torch.manual_seed(0)
    tmp_path = tmp_path_factory.mktemp("layout")
    watch = Watch(log_every_n_steps=2)
    trainer = make_trainer(tmp_path, [watch], max_steps=6)
    with pytest.warns(UserWarning):
        trainer.fit(TinyRegressor(net=_dead_net()), regression_loader())
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return watch, trainer, acc


def test_one_section_per_metric_and_modules_in_registration_order(dead_run):
    _watch, trainer, acc = dead_run
    tags = acc.Tags()["scalars"]
    ours = [t for t in tags if t.startswith("watch")]
    assert ours and not [t for t in ours if t.startswith("watch/")]  # nothing left in the old layout
    # the Scalars tab groups by the text before the first "/": one section per metric + one global
    sections = {t.split("/", 1)[0] for t in ours}
    assert {"watch.grad_norm", "watch.dead_frac", "watch.update_ratio", "watch.act_rms", "watch.global"} <= sections
    # per-module charts: <two-digit index>.<name>, the index being named_modules() order (net = 00)
    names = [name for name, _ in trainer.lightning_module.named_modules() if name]
    grad = sorted(t for t in ours if t.startswith("watch.grad_norm/"))
    assert grad == ["watch.grad_norm/01.net.0", "watch.grad_norm/03.net.2", "watch.grad_norm/05.net.4"]
    for tag in ours:
        _metric, module = parse_tag(tag)
        if module is not None:
            index = int(tag.split("/", 1)[1].split(".", 1)[0])
            assert names[index] == module, tag
    # an alphabetical sort of a section (what TensorBoard does) is the forward order of the layers
    act = sorted(t for t in ours if t.startswith("watch.act_rms/"))
    assert [parse_tag(t)[1] for t in act] == [n for n in names if f"watch.act_rms/{names.index(n):02d}.{n}" in act]
    assert [parse_tag(t)[1] for t in act][:2] == ["net.0", "net.1"]


def test_values_under_new_tags_are_the_snapshot_values(dead_run):
    watch, trainer, acc = dead_run
    last = watch.last_snapshot
    logged = {tag: acc.Scalars(tag)[-1] for tag in acc.Tags()["scalars"] if tag.startswith("watch.")}
    assert logged["watch.grad_norm/01.net.0"].step == last.step
    assert logged["watch.grad_norm/01.net.0"].value == pytest.approx(last.get("grad_norm", "net.0"), rel=1e-6)
    assert logged["watch.global/grad_norm"].value == pytest.approx(last.get("grad_norm"), rel=1e-6)
    # the test helper's spelling without the index reads the same points
    assert read_scalars(trainer.logger.log_dir)["watch/grad_norm/net.0"][-1][1] == pytest.approx(
        logged["watch.grad_norm/01.net.0"].value
    )


def test_custom_scalars_led_by_diagnostics_and_no_empty_chart(dead_run):
    _, _, acc = dead_run
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    first = layout.category[0]
    assert first.title == "lightning_watch" and not first.closed
    assert [c.title for c in first.chart][:3] == ["dead_frac", "grad_norm", "update_ratio"]
    assert all(category.closed for category in layout.category[1:])
    tags = acc.Tags()["scalars"]
    for category in layout.category:
        for chart in category.chart:
            (pattern,) = chart.multiline.tag
            matched = [t for t in tags if re.search(pattern, t)]
            assert matched, f"empty chart {chart.title!r} ({pattern})"
    titles = [c.title for category in layout.category for c in category.chart]
    assert "act_saturated_frac" not in titles  # ReLU and Linear only: nothing saturates, no chart
    assert "global/grad_norm_clipped" not in titles  # no clipping configured


def test_one_text_tag_per_alert_code_and_module(dead_run):
    watch, _, acc = dead_run
    dead = [a for a in watch.alerts if a.code == "dead_units"]
    steps = [a.step for a in dead]
    assert len({a.module for a in dead}) >= 2 and len(set(steps)) < len(steps)  # two modules, one step
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("alerts/")]
    for alert in watch.alerts:
        where = f"/{alert.module}" if alert.module else ""
        tag = f"alerts/{alert.code}{where}/text_summary"
        assert tag in texts, tag
        shown = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
        assert any(f"`{alert.code}`" in text and (alert.module or "") in text for text in shown)
    assert len({t for t in texts if t.startswith("alerts/dead_units/")}) == len({a.module for a in dead})


def test_parse_tag_reads_both_layouts_and_refuses_others():
    assert parse_tag("watch.grad_norm/03.encoder.fc1") == ("grad_norm", "encoder.fc1")
    assert parse_tag("watch.grad_norm/11.10.0") == ("grad_norm", "10.0")  # Sequential child names are digits
    assert parse_tag("watch.global/grad_norm") == ("grad_norm", None)
    assert parse_tag("watch/grad_norm/encoder.fc1") == ("grad_norm", "encoder.fc1")
    assert parse_tag("watch/global/loss") == ("loss", None)
    assert parse_tag("watch.activity_penalty/07.rule?") == ("activity_penalty", "rule?")
    for foreign in ("train_loss", "watch", "watch/", "watch/x", "watchers/a/b", "watch./a", "epoch", "val/acc"):
        assert parse_tag(foreign) is None, foreign


def test_module_order_is_stable_and_wide_enough():
    order = ModuleOrder(f"layer{i}" for i in range(120))
    assert order.tag("grad_norm", "layer7") == "watch.grad_norm/007.layer7"  # 3 digits for 120 modules
    assert order.tag("grad_norm", "layer7.weight") == "watch.grad_norm/007.layer7.weight"  # per-parameter
    assert order.index("rule_b") == 120 and order.index("rule_a") == 121 and order.index("rule_b") == 120
    snap = Snapshot(step=0, epoch=0)
    snap.put("dead_frac", 0.5, "layer3")
    snap.put("dead_frac", 0.5, "layer1")  # written out of order: the model's order decides the tag
    assert list(snap.scalars(order)) == ["watch.dead_frac/003.layer3", "watch.dead_frac/001.layer1"]
    assert scalar_tag("loss") == "watch.global/loss"
