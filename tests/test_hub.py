"""StatHub: one per Trainer; members join and leave; the last member to end a batch publishes one read."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyRegressor, make_trainer, quiet_fit, read_points, read_scalars, regression_loader
from lightning.pytorch import Callback

from lightning_watch import GradientNormMonitor, Watch
from lightning_watch import hub as hub_module
from lightning_watch.cadence import Cadence
from lightning_watch.hub import StatHub, StatSource
from lightning_watch.stats import StatBlock

EVERY = Cadence(log=1, sample=1)


class Counter:
    """A StatSource with one device sum: what it was fed since its last read."""

    def __init__(self, name: str, cadence: Cadence | None = EVERY, rides_along: bool = False) -> None:
        self.name, self.cadence, self.rides_along = name, cadence, rides_along
        self.total = torch.zeros((), dtype=torch.float64)
        self.resets = 0

    def collect(self) -> StatBlock:
        block = StatBlock()
        block.add_sum(f"{self.name}.total", self.total)
        return block

    def finalize(self, values, snapshot) -> None:
        snapshot.put(f"{self.name}_total", values[f"{self.name}.total"])

    def reset(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.resets += 1

    def histograms(self) -> dict[str, torch.Tensor]:
        return {f"hist/{self.name}": torch.arange(4.0)}


@pytest.fixture
def trainer(tmp_path):
    return make_trainer(tmp_path, [])


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """Number of blocks of each packed read the hub makes (one read = one collective + one host copy)."""
    counts: list[int] = []
    real = hub_module.read_blocks

    def counting(blocks, gather=None):
        counts.append(len(blocks))
        return real(blocks, gather=gather)

    monkeypatch.setattr(hub_module, "read_blocks", counting)
    return counts


def test_a_counter_is_a_stat_source():
    assert isinstance(Counter("a"), StatSource)  # the protocol the test double stands for


def test_one_hub_per_trainer_and_the_last_member_to_leave_forgets_it(trainer, tmp_path):
    hub = StatHub.for_trainer(trainer)
    assert StatHub.for_trainer(trainer) is hub
    assert StatHub.for_trainer(make_trainer(tmp_path / "other", [])) is not hub
    a, b = Counter("a"), Counter("b")
    hub.join("first", [a])
    hub.join("second", [b])
    assert hub.members == ["first", "second"] and hub.sources() == [a, b]
    hub.join("first", [])  # joining again replaces the member's sources
    assert hub.members == ["first", "second"] and hub.sources() == [b]
    hub.leave("nobody")  # leaving without having joined is harmless
    hub.leave("first")
    assert hub.members == ["second"] and StatHub.for_trainer(trainer) is hub
    hub.leave("second")
    fresh = StatHub.for_trainer(trainer)
    assert fresh is not hub and fresh.members == []


def test_the_last_member_to_end_the_batch_publishes_one_read_for_all(trainer, reads):
    hub = StatHub.for_trainer(trainer)
    a, b = Counter("a"), Counter("b")
    hub.join("first", [a])
    hub.join("second", [b])
    a.total += 2
    b.total += 3
    model = TinyRegressor()
    assert hub.batch_end("first", trainer, model) is None
    assert hub.batch_end("first", trainer, model) is None  # reporting twice does not stand in for another member
    assert hub.batch_end("stranger", trainer, model) is None  # nor does a callback that never joined
    assert reads == []
    snapshot = hub.batch_end("second", trainer, model)
    assert snapshot is not None and snapshot.step == 0
    assert snapshot.get("a_total") == 2.0 and snapshot.get("b_total") == 3.0
    assert reads == [2]  # both members' sources in one read
    assert (a.resets, b.resets) == (1, 1) and hub.last_snapshot is snapshot
    assert hub.batch_end("second", trainer, model) is None  # a new batch: "first" has not reported yet
    trainer.logger.experiment.flush()
    assert read_scalars(trainer.logger.log_dir)["watch/global/a_total"] == [(0, 2.0)]  # written by the hub


def test_only_due_sources_cause_a_read_and_riders_join_one(trainer, reads):
    hub = StatHub.for_trainer(trainer)
    later = Counter("later", Cadence(log=2, sample=1, histogram=1))  # step 0: histogram step, not a log step
    rider = Counter("rider", cadence=None, rides_along=True)
    idle = Counter("idle", cadence=None)  # not set up: never read
    hub.join("m", [later, rider, idle])
    model = TinyRegressor()
    assert hub.batch_end("m", trainer, model) is None and reads == []  # a rider never causes a read
    hub.join("m", [Counter("due"), rider, idle])
    rider.total += 5
    snapshot = hub.batch_end("m", trainer, model)
    assert reads == [2] and snapshot.get("rider_total") == 5.0
    assert math.isnan(snapshot.get("idle_total")) and idle.resets == 0
    # the histogram of the source whose histogram step it was is written even without a read
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer.logger.experiment.flush()
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    assert acc.Tags()["histograms"] == ["hist/later"]
    assert [h.step for h in acc.Histograms("hist/later")] == [0]


def test_listeners_hear_each_notified_publication_once(trainer):
    hub = StatHub.for_trainer(trainer)
    source = Counter("a")
    hub.join("m", [source])
    model = TinyRegressor()
    heard = []

    def listener(tr, module, snapshot):
        heard.append((tr, module, snapshot))

    hub.listen(listener)
    hub.listen(listener)  # listening twice: still called once
    first = hub.publish(trainer, model, [source])
    assert heard == [(trainer, model, first)]
    unnotified = hub.publish(trainer, model, [source], notify=False)
    assert len(heard) == 1 and hub.last_snapshot is first and unnotified is not first
    hub.unlisten(listener)
    hub.publish(trainer, model, [source])
    assert len(heard) == 1


def test_a_standalone_monitor_and_a_watch_share_the_hub_and_write_each_point_once(tmp_path):
    members = []

    class Members(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            members.append(len(StatHub.for_trainer(trainer).members))

    torch.manual_seed(0)
    grads = GradientNormMonitor(log_every_n_steps=2)
    watch = Watch(log_every_n_steps=2, alerts=False)
    trainer = make_trainer(tmp_path, [grads, watch, Members()], max_steps=4, log_every_n_steps=2)
    quiet_fit(trainer, TinyRegressor(), regression_loader())
    assert members == [2, 2, 2, 2]  # the monitor and the Watch, every batch
    assert StatHub.for_trainer(trainer).members == []  # both left at the end of fit
    points = read_points(trainer.logger.log_dir)
    assert ("watch/grad_norm/net.0", 1) in points and ("watch/act_rms/net.0", 3) in points
    assert {key: values for key, values in points.items() if len(values) > 1} == {}  # each (tag, step) once
    # the monitor and the Watch saw the same step's gradients
    assert grads.last_snapshot.step == watch.last_snapshot.step == 3
    assert grads.last_snapshot.get("grad_norm", "net.0") == watch.last_snapshot.get("grad_norm", "net.0")
