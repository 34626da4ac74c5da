"""Distributed setups: DDP with 2 gloo processes on CPU, and the sharded (FSDP-like) reduction path.

One externally launched 2-process group (as torchrun would start it) runs every fit of this file
with Lightning's ``strategy="ddp"``: one start serves all fits, and no ``ddp_spawn`` exit aborts.
Each rank gets different data (a ``DistributedSampler`` over a dataset whose even and odd samples
differ in sign pattern and scale), so a rank-local statistic cannot pass for a global one.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import itertools
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import join_two_process_group, legacy_tag, make_trainer, quiet_fit, read_scalars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import EarlyAlerts, Watch
from lightning_watch.alerts import AlertError
from lightning_watch.alerts.alert import Alert
from lightning_watch.command import main as command_main
from lightning_watch.hub import StatHub
from lightning_watch.monitors import GradientNormMonitor, ParameterDeltaMonitor
from lightning_watch.monitors.base import strategy_shards_parameters
from lightning_watch.pace import Pace
from lightning_watch.snapshot import Snapshot
from lightning_watch.stats import read_blocks

N, BATCH = 16, 4  # 8 samples per rank: 2 steps of 4


def probe_data(n: int = N) -> TensorDataset:
    """Even samples fire fc1 unit 0 only (scale ~1), odd samples unit 1 only (scale ~10).

    An unshuffled DistributedSampler gives rank r the indices r, r+2, ...: rank 0 sees only even
    samples, rank 1 only odd ones. Unit 2 (``-x0 - x1``) never fires.
    """
    a = 1.0 + torch.arange(n, dtype=torch.float32) / n
    even = torch.stack([a, -a / 2], dim=1)
    odd = 10 * torch.stack([-a / 2, a], dim=1)
    x = torch.where((torch.arange(n) % 2 == 0)[:, None], even, odd)
    y = (torch.arange(n, dtype=torch.float32) % 3)[:, None]
    return TensorDataset(x, y)


class Probe(pl.LightningModule):
    """fc1 (2 -> 3, fixed rows e0, e1, -(e0 + e1)) -> ReLU -> fc2; lr 0 keeps it fixed."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(3, 1)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
            self.fc1.bias.zero_()
            self.fc2.weight.copy_(torch.tensor([[0.5, -0.25, 1.0]]))
            self.fc2.bias.fill_(0.1)
        self.lr = lr
        self.seen: list[torch.Tensor] = []  # the batches this rank trained on

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.detach().clone())
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def rank_loader(rank: int, n: int = N) -> DataLoader:
    """This rank's half of :func:`probe_data`, in order (Lightning's own sampler would shuffle)."""
    data = probe_data(n)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
    return DataLoader(data, batch_size=BATCH, sampler=sampler)


class BatchNormProbe(Probe):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))

    def forward(self, x):
        return self.net(x)


def rank_one_rule(rank: int, first_step: int = 1):
    """A user rule that fires on rank 1 only, from logging step ``first_step`` on."""

    def rule(snapshot: Snapshot, ctx) -> list[Alert]:
        if rank != 1 or snapshot.step < first_step:
            return []
        return [
            Alert(
                code="rank_local",
                severity="error",
                step=snapshot.step,
                epoch=snapshot.epoch,
                module=None,
                value=1.0,
                threshold=0.0,
                message="seen on rank 1 only",
                hint="none",
            )
        ]

    rule.codes = ("rank_local",)
    return rule


class LabelProbe(pl.LightningModule):
    """A 3-class classifier: integer labels let the label-run check look at each rank's batches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(2, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.fc(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def label_loader(rank: int) -> DataLoader:
    """Shuffled batches (no sampler finding); rank 1's labels are all 0, rank 0's mixed."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(32, 2, generator=g)
    y = torch.zeros(32, dtype=torch.long) if rank == 1 else torch.arange(32) % 3
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=g)


def _count_gathers_per_publish(counts: list[int]):
    """Wrap the hub's publish: count ``trainer.strategy.all_gather`` calls made inside it."""
    original = StatHub.publish

    def publish(hub, trainer, *args, **kwargs):
        strategy = trainer.strategy
        calls = []
        gather = strategy.all_gather

        def counting(*a, **k):
            calls.append(1)
            return gather(*a, **k)

        own = strategy.__dict__.get("all_gather")  # another counter may have wrapped it already
        strategy.all_gather = counting
        try:
            return original(hub, trainer, *args, **kwargs)
        finally:
            _restore(strategy, "all_gather", own)
            counts.append(len(calls))

    StatHub.publish = publish
    return lambda: setattr(StatHub, "publish", original)


def _restore(obj, name: str, own) -> None:
    """Put back an instance attribute (``own``), or fall back to the class's method."""
    if own is not None:
        setattr(obj, name, own)
    else:
        obj.__dict__.pop(name, None)


COLLECTIVES = ("all_gather", "reduce", "reduce_boolean_decision", "broadcast", "barrier")


def _count_collectives_per_batch(watch: Watch, strategy) -> list[int]:
    """Strategy collectives issued inside ``watch.on_train_batch_end``, one count per batch."""
    counts: list[int] = []
    hook = watch.on_train_batch_end

    def counted(*args, **kwargs):
        calls, depth = [], []
        originals = {name: getattr(strategy, name) for name in COLLECTIVES}
        own = {name: strategy.__dict__.get(name) for name in COLLECTIVES}
        for name, original in originals.items():

            def wrapper(*a, _original=original, **k):
                calls.append(1)  # counted once: `reduce_boolean_decision` calls `reduce` inside
                depth.append(1)
                try:
                    if len(depth) > 1:
                        calls.pop()
                    return _original(*a, **k)
                finally:
                    depth.pop()

            setattr(strategy, name, wrapper)
        try:
            return hook(*args, **kwargs)
        finally:
            for name in COLLECTIVES:
                _restore(strategy, name, own[name])
            counts.append(len(calls))

    watch.on_train_batch_end = counted
    return counts


class SlowBusyBatches(pl.Callback):
    """Before ``watch`` in the callbacks: sleeps ``seconds`` at the end of each batch ``watch`` measures in
    but does not read. (On a batch that reads, the other rank would wait for the sleep in the read's
    collective, inside its own busy batch; after a batch that does not, it waits in the next batch's
    gradient all-reduce, a quiet batch, and its own share stays its own.)"""

    def __init__(self, watch: Watch, seconds: float) -> None:
        self.watch, self.seconds = watch, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if self.seconds and not self.watch._plain and not self.watch.monitors[0].cadence.is_log_step(step):
            time.sleep(self.seconds)


def _sharded_reduction(rank: int) -> dict[str, float]:
    """Each rank holds one half (rows) of a parameter and its gradient, as FSDP would shard it.

    The monitors run their public measuring steps (prepare, start, before/after one SGD step) on
    the shard, under a stand-in Trainer whose strategy is Lightning's FSDP (sharded) or DDP
    (replicated) class, and are read with the rank's real gloo all-gather: sharded, the squares
    add up to the full tensor's norm.
    """
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    torch.manual_seed(0)
    full_w, full_g = torch.randn(4, 3), torch.randn(4, 3)
    shard = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        shard.weight.copy_(full_w[2 * rank : 2 * rank + 2])
    model = nn.Module()
    model.layer = shard
    model.device, model.automatic_optimization = torch.device("cpu"), True

    def gather(t):
        out = [torch.empty_like(t) for _ in range(2)]
        torch.distributed.all_gather(out, t)
        return torch.stack(out)

    results = {}
    for sharded in (True, False):
        shard.weight.grad = full_g[2 * rank : 2 * rank + 2].clone()
        optimizer = torch.optim.SGD(shard.parameters(), lr=0.5)  # the update: -0.5 * grad on this shard
        trainer = SimpleNamespace(
            strategy=FSDPStrategy() if sharded else DDPStrategy(),
            optimizers=[optimizer],
            gradient_clip_val=None,
            log_every_n_steps=1,
            fast_dev_run=False,
            world_size=2,
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)),  # Lightning's step 0
        )
        monitors = grads, deltas = GradientNormMonitor(log_every_n_steps=1), ParameterDeltaMonitor(log_every_n_steps=1)
        for monitor in monitors:
            monitor.prepare(trainer, model)
            monitor.start(trainer, model)
            monitor.begin_batch(0)
            monitor.before_optimizer_step(trainer, model, optimizer, 0)
        saved = shard.weight.detach().clone()
        optimizer.step()
        for monitor in monitors:
            monitor.end_batch(trainer, model, True, 0)
        with torch.no_grad():
            shard.weight.copy_(saved)
        values = read_blocks([grads.collect(), deltas.collect()], gather=gather)
        snapshot = Snapshot(step=0, epoch=0)
        for monitor in monitors:
            monitor.finalize(values, snapshot)
            monitor.stop()
        tag = "sharded" if sharded else "replicated"
        results[f"{tag}.grad_norm"] = snapshot.get("grad_norm", "layer")
        results[f"{tag}.global_grad_norm"] = snapshot.get("grad_norm")
        results[f"{tag}.update_norm"] = snapshot.get("update_norm", "layer")
        results[f"{tag}.param_norm"] = snapshot.get("param_norm", "layer")
        results[f"{tag}.optimizer_steps"] = snapshot.get("optimizer_steps")
    results["full.grad_norm"] = full_g.norm().item()
    results["full.param_norm"] = full_w.norm().item()
    results["full.update_norm"] = (0.5 * full_g).norm().item()
    return results


def _worker(rank: int, out: str, port: int) -> None:
    join_two_process_group(rank, port)
    out = Path(out)
    result: dict = {"rank": rank}
    try:
        # -------- fit 1: global statistics, one collective per logging step, rank-zero writes
        counts: list[int] = []
        restore = _count_gathers_per_publish(counts)
        snapshots: list[dict] = []
        watch = Watch(log_every_n_steps=1, sample_every_n_steps=1)
        # logging steps only: the end of fit hands the last one again, marked final (no new read)
        watch.add_listener(
            lambda t, m, s: s.final or snapshots.append({legacy_tag(k): v for k, v in s.scalars().items()})
        )
        logger = pl.loggers.TensorBoardLogger(str(out), name="tb", version=0)
        trainer = make_trainer(out, [watch], strategy="ddp", devices=2, logger=logger, use_distributed_sampler=False)
        per_batch = _count_collectives_per_batch(watch, trainer.strategy)
        model = Probe()
        try:
            quiet_fit(trainer, model, rank_loader(rank))
        finally:
            restore()
        result.update(
            snapshots=snapshots,
            gathers=counts,
            alerts=[(a.code, a.module, a.step) for a in watch.alerts],
            global_step=trainer.global_step,
            seen=model.seen,
            collectives=per_batch,
        )

        # -------- fit 2: a stop decided on rank 1 only is agreed by both ranks (no hang)
        alerts = EarlyAlerts(actions={"rank_local": "stop"}, rules=[rank_one_rule(rank)])
        watch = Watch(log_every_n_steps=1, alerts=alerts)
        trainer = make_trainer(out / "stop", [watch], strategy="ddp", devices=2, logger=False, max_steps=6)
        per_batch = _count_collectives_per_batch(watch, trainer.strategy)
        quiet_fit(trainer, Probe(lr=0.01), DataLoader(probe_data(64), batch_size=BATCH))
        result.update(
            stop_step=trainer.global_step,
            stop_codes=[a.code for a in watch.alerts],
            stop_alert=None if alerts.stop_alert is None else alerts.stop_alert.code,
            stop_collectives=per_batch,
        )

        # -------- a rank-local check before the read (rank 1's first 2 batches hold one label each):
        # its "stop" joins the same step's one read, so both ranks stop at that step
        alerts = EarlyAlerts(actions={"unshuffled_data": "stop"}, label_batches=2)
        watch = Watch(log_every_n_steps=1, alerts=alerts)
        trainer = make_trainer(
            out / "labels", [watch], strategy="ddp", devices=2, logger=False, max_steps=6, use_distributed_sampler=False
        )
        per_batch = _count_collectives_per_batch(watch, trainer.strategy)
        quiet_fit(trainer, LabelProbe(), label_loader(rank))
        result.update(
            label_step=trainer.global_step,
            label_codes=[a.code for a in watch.alerts],
            label_alert=None if alerts.stop_alert is None else alerts.stop_alert.code,
            label_collectives=per_batch,
        )

        # -------- small_batch_norm: a plain BatchNorm normalizes over its rank's 4 samples only
        # (`sync_batchnorm=True` cannot run here: DDP refuses SyncBatchNorm on CPU modules)
        watch = Watch(log_every_n_steps=1)
        trainer = make_trainer(out / "bn", [watch], strategy="ddp", devices=2, logger=False, max_steps=1)
        quiet_fit(trainer, BatchNormProbe(), rank_loader(rank))
        result["bn"] = [(a.code, a.module, a.value) for a in watch.alerts if a.code == "small_batch_norm"]

        # -------- the time budget: only rank 1 is slow on its busy batches, so only its own share is over
        # budget; the share joins the read as a maximum, and both ranks stretch at the same read (one
        # rank stretching alone would skip reads the other makes, and hang it in a collective)
        watch = Watch(pictures=False, report=False, budget=0.5)
        reads: list[int] = []
        watch.add_listener(lambda t, m, s: s.final or reads.append(s.step))
        slow = SlowBusyBatches(watch, seconds=0.1 if rank == 1 else 0.0)
        trainer = make_trainer(out / "pace", [slow, watch], strategy="ddp", devices=2, logger=False, max_steps=80)
        local: list[float | None] = []  # each rank's own estimate, before the read reduces it
        collect = Pace.collect
        Pace.collect = lambda self: (local.append(self.share), collect(self))[1]
        try:
            quiet_fit(trainer, Probe(lr=0.01), DataLoader(probe_data(640), batch_size=BATCH))
        finally:
            Pace.collect = collect
        result["pace"] = {"reads": reads, "factor": watch._pace.factor, "local": local}

        # -------- the sharded reduction path, on the same gloo group
        result["sharded"] = _sharded_reduction(rank)
        torch.save(result, out / f"rank{rank}.pt")

        # -------- last: a "raise" decided on rank 1 only raises on both ranks (no rank left waiting)
        alerts = EarlyAlerts(actions={"rank_local": "raise"}, rules=[rank_one_rule(rank)])
        trainer = make_trainer(
            out / "raise",
            [Watch(log_every_n_steps=1, alerts=alerts)],
            strategy="ddp",
            devices=2,
            logger=False,
            max_steps=6,
        )
        raised = None
        try:
            quiet_fit(trainer, Probe(lr=0.01), DataLoader(probe_data(64), batch_size=BATCH))
        except AlertError as err:
            raised = (err.alert.code, trainer.global_step)
        torch.save(raised, out / f"raise{rank}.pt")

        # -------- a "raise" found on rank 1 at the last logging step: no read follows, so it is
        # agreed when fit ends, and both ranks raise (neither finishes while the other fails)
        alerts = EarlyAlerts(actions={"rank_local": "raise"}, rules=[rank_one_rule(rank, first_step=3)])
        watch = Watch(log_every_n_steps=1, alerts=alerts)
        trainer = make_trainer(out / "raise_end", [watch], strategy="ddp", devices=2, logger=False, max_steps=4)
        per_batch = _count_collectives_per_batch(watch, trainer.strategy)
        raised = None
        try:
            quiet_fit(trainer, Probe(lr=0.01), DataLoader(probe_data(64), batch_size=BATCH))
        except AlertError as err:
            raised = (err.alert.code, trainer.global_step)
        torch.save({"raised": raised, "collectives": per_batch}, out / f"raise_end{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_group(tmp_path: Path, timeout: float = 120.0) -> list[dict]:
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    context = torch.multiprocessing.spawn(_worker, args=(str(tmp_path), find_free_network_port()), nprocs=2, join=False)
    deadline = timeout
    while not context.join(timeout=5):
        deadline -= 5
        if deadline <= 0:  # a rank left waiting in a collective: fail instead of hanging CI
            for process in context.processes:
                process.kill()
            raise AssertionError("the 2-process DDP group did not finish: a rank hangs in a collective")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, result in enumerate(ranks):
        result["raised"] = torch.load(tmp_path / f"raise{r}.pt", weights_only=False)
        result["raise_end"] = torch.load(tmp_path / f"raise_end{r}.pt", weights_only=False)
    return ranks


def reference(model: Probe, step: int) -> dict[str, float]:
    """Plain-PyTorch values for logging step ``step``: both ranks' batches, DDP-averaged gradients."""
    x, y = probe_data().tensors
    idx = torch.arange(step * 2 * BATCH, (step + 1) * 2 * BATCH)  # the union of both ranks' batches
    rank_idx = [idx[idx % 2 == r] for r in range(2)]
    model.zero_grad()
    loss = sum(nn.functional.mse_loss(model(x[i]), y[i]) for i in rank_idx) / 2  # DDP averages
    loss.backward()
    h = model.fc1(x[idx]).detach()
    grads = [p.grad for p in model.parameters()]
    return {
        "fc1.mean": h.mean().item(),
        "fc1.rms": h.square().mean().sqrt().item(),
        "act.mean": h.relu().mean().item(),
        "act.dead": ((h.relu() > 0).sum(0) == 0).double().mean().item(),
        "rank0.act.dead": ((h[idx % 2 == 0].relu() > 0).sum(0) == 0).double().mean().item(),
        "fc1.grad": torch.cat([model.fc1.weight.grad.flatten(), model.fc1.bias.grad]).norm().item(),
        "global.grad": torch.cat([g.flatten() for g in grads]).norm().item(),
        "rank0.fc1.grad": _rank_grad(model, x[rank_idx[0]], y[rank_idx[0]]),
    }


def _rank_grad(model: Probe, x, y) -> float:
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    return torch.cat([model.fc1.weight.grad.flatten(), model.fc1.bias.grad]).norm().item()


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """Runs the 2-process group once for the tests below: ``(results per rank, output folder)``."""
    path = tmp_path_factory.mktemp("ddp")
    return _run_group(path), path


def test_ddp_two_gloo_processes(group):
    ranks, tmp_path = group
    r0, r1 = ranks

    # the premise: each rank trained on its own half (rank r: samples r, r + 2, ...)
    x = probe_data().tensors[0]
    for r, result in enumerate(ranks):
        torch.testing.assert_close(torch.cat(result["seen"]), x[r::2])

    # ---- activation statistics, dead units and gradient norms are global
    refs = [reference(Probe(), k) for k in range(2)]
    assert len(r0["snapshots"]) == 2 and r0["global_step"] == 2
    for snap, ref in zip(r0["snapshots"], refs):
        assert math.isclose(snap["watch/act_mean/fc1"], ref["fc1.mean"], rel_tol=1e-5)
        assert math.isclose(snap["watch/act_rms/fc1"], ref["fc1.rms"], rel_tol=1e-5)
        assert math.isclose(snap["watch/act_mean/act"], ref["act.mean"], rel_tol=1e-5)
        # unit 0 fires on rank 0 only, unit 1 on rank 1 only, unit 2 nowhere: 1/3 dead, not 2/3
        assert math.isclose(ref["act.dead"], 1 / 3, rel_tol=1e-6)
        assert math.isclose(ref["rank0.act.dead"], 2 / 3, rel_tol=1e-6)
        assert math.isclose(snap["watch/dead_frac/act"], ref["act.dead"])
        assert math.isclose(snap["watch/dead_frac/fc1"], 1 / 3)
        # the synchronized gradient, not rank 0's own (which is far smaller: its data is 10x smaller)
        assert math.isclose(snap["watch/grad_norm/fc1"], ref["fc1.grad"], rel_tol=1e-5)
        assert math.isclose(snap["watch/global/grad_norm"], ref["global.grad"], rel_tol=1e-5)
        assert not math.isclose(ref["fc1.grad"], ref["rank0.fc1.grad"], rel_tol=0.1)
    # every rank publishes the same snapshot
    assert r0["snapshots"] == r1["snapshots"]

    # ---- one collective per logging step from lightning_watch, on every rank
    assert r0["gathers"] == [1, 1] and r1["gathers"] == [1, 1]
    assert r0["collectives"] == r1["collectives"] == [1, 1]  # nothing else in the batch-end hook

    # ---- only rank zero writes: one event file, whose values are the global ones
    event_files = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1
    scalars = read_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["watch/act_mean/fc1"]] == [0, 1]
    for (_, value), ref in zip(scalars["watch/act_mean/fc1"], refs):
        assert math.isclose(value, ref["fc1.mean"], rel_tol=1e-5)
    # alerts: identical on both ranks, written once (rank zero) to alerts.jsonl
    assert r0["alerts"] == r1["alerts"]
    # (lr 0 makes "stalled_parameters" fire: the weights really do not move)
    assert ("stalled_parameters", "fc1", 1) in r0["alerts"]
    lines = (tmp_path / "tb" / "version_0" / "alerts.jsonl").read_text().splitlines()
    assert [json.loads(line)["code"] for line in lines] == [code for code, _, _ in r0["alerts"]]

    # ---- a stop raised on rank 1 only stops both ranks at the same step
    assert "rank_local" in r1["stop_codes"] and "rank_local" not in r0["stop_codes"]
    assert r1["stop_alert"] == "rank_local"
    assert r0["stop_alert"] == "remote_alert"  # rank 0 stops on rank 1's finding
    # the rule fires on rank 1 after the read of logging step 1; the read of step 2 tells rank 0,
    # and both stop there (global step 3), not one rank at step 1 and the other never
    assert r0["stop_step"] == r1["stop_step"] == 3

    # ---- "raise" decided on rank 1 only: both ranks raise at the same step
    assert r1["raised"] == ("rank_local", 3)
    assert r0["raised"] == ("remote_alert", 3)

    # ---- a rank-local check made before the read: agreed in that very read (logging step 1)
    assert "unshuffled_data" in r1["label_codes"] and "unshuffled_data" not in r0["label_codes"]
    assert (r0["label_alert"], r1["label_alert"]) == ("remote_alert", "unshuffled_data")
    assert r0["label_step"] == r1["label_step"] == 2
    assert r0["label_collectives"] == r1["label_collectives"] == [1, 1]

    # ---- a "raise" found after the last read: agreed when fit ends, raised on both ranks
    assert r1["raise_end"]["raised"] == ("rank_local", 4)
    assert r0["raise_end"]["raised"] == ("remote_alert", 4)
    assert r0["raise_end"]["collectives"] == r1["raise_end"]["collectives"] == [1, 1, 1, 1]

    # ---- an unsynchronized BatchNorm under DDP sees its rank's batch: 4 samples, below 8
    assert r0["bn"] == r1["bn"] == [("small_batch_norm", "net.1", 4.0)]

    # ---- sharded (FSDP-like) reduction: halves add up to the full norm; max would not
    for r in ranks:
        s = r["sharded"]
        for metric in ("grad_norm", "global_grad_norm", "update_norm", "param_norm"):
            full = s[f"full.{metric.replace('global_', '')}"]
            assert math.isclose(s[f"sharded.{metric}"], full, rel_tol=1e-6), metric
            assert s[f"replicated.{metric}"] < full * 0.999, metric
        # one optimizer step on every rank: a count, the same under either reduction
        assert s["sharded.optimizer_steps"] == s["replicated.optimizer_steps"] == 1


def test_the_time_budget_stretches_both_ranks_at_the_same_read(group):
    r0, r1 = (result["pace"] for result in group[0])
    assert r0["reads"] == r1["reads"] and r0["factor"] == r1["factor"] > 1  # no rank left waiting
    # over budget on rank 1 only, and rank 0 stretched with it
    assert max(share or 0.0 for share in r1["local"]) > 0.5
    assert all((share or 0.0) < 0.5 for share in r0["local"])
    assert r0["reads"][:4] == [9, 19, 29, 39]  # four windows at the resolved cadence, then longer ones
    assert max(b - a for a, b in itertools.pairwise(r0["reads"])) > 10


def test_agreed_actions_add_no_collective(group):
    ranks, _ = group
    for r in ranks:
        assert r["stop_collectives"] and set(r["stop_collectives"]) == {1}, r["stop_collectives"]


def test_fsdp_strategy_is_detected_as_sharded():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    assert strategy_shards_parameters(SimpleNamespace(strategy=FSDPStrategy()))
    assert not strategy_shards_parameters(SimpleNamespace(strategy=DDPStrategy()))


class SpawnProbe(Probe):
    """``Probe`` that builds its rank's loader itself: under ``ddp_spawn`` ranks start from a pickle."""

    def train_dataloader(self):
        return rank_loader(self.global_rank)


class DestroyGroupAtExit(pl.Callback):
    """Works around an upstream crash at worker exit, unrelated to lightning_watch.

    A ``ddp_spawn`` worker that exits without ``destroy_process_group()`` sometimes aborts during
    interpreter finalization ("terminate called without an active exception": Gloo's threads still
    hold work objects; pytorch/pytorch#179291). Bare Lightning does it too: 3 fits in 20 on this
    machine with torch 2.13. Destroying the group at exit, while the interpreter is alive, avoids it.
    """

    def teardown(self, trainer, pl_module, stage):
        atexit.register(_destroy_process_group)


def _destroy_process_group():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_ddp_spawn_writes_global_statistics_from_rank_zero(tmp_path):
    # The processes are started by Lightning; only the event file of rank zero comes back.
    watch = Watch(log_every_n_steps=1, sample_every_n_steps=1, alerts=False)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)  # fixed: see the README
    trainer = make_trainer(
        tmp_path,
        [watch, DestroyGroupAtExit()],
        strategy="ddp_spawn",
        devices=2,
        logger=logger,
        use_distributed_sampler=False,
    )
    quiet_fit(trainer, SpawnProbe(), None)
    assert len(list((tmp_path / "tb").rglob("events.out.tfevents.*"))) == 1
    scalars = read_scalars(tmp_path / "tb")
    refs = [reference(Probe(), k) for k in range(2)]
    assert [s for s, _ in scalars["watch/act_rms/fc1"]] == [0, 1]
    for k, ref in enumerate(refs):
        assert math.isclose(scalars["watch/act_rms/fc1"][k][1], ref["fc1.rms"], rel_tol=1e-5)
        assert math.isclose(scalars["watch/dead_frac/act"][k][1], ref["act.dead"], rel_tol=1e-6)
        assert math.isclose(scalars["watch/grad_norm/fc1"][k][1], ref["fc1.grad"], rel_tol=1e-5)
    # the command line reads a DDP run's directory back like any other
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert command_main(["report", str(tmp_path / "tb"), "--json", "-q"]) == 0
    layers = {row["layer"]: row for run in json.loads(out.getvalue())["runs"] for row in run["layers"]}
    assert math.isclose(layers["fc1"]["grad_norm"], scalars["watch/grad_norm/fc1"][-1][1], rel_tol=1e-6)


def test_sync_batch_norm_counts_the_global_batch():
    # DDP refuses SyncBatchNorm on CPU ("SyncBatchNorm layers only work with GPU modules"), so the
    # recorder and the check are driven directly: 4 samples per rank, threshold 8.
    from lightning_watch.alerts.checks import ForwardRecorder, check_batch_norm

    model = nn.Sequential(nn.Linear(2, 3), nn.SyncBatchNorm(3), nn.BatchNorm1d(3))
    recorder = ForwardRecorder(model)
    model(torch.randn(4, 2))
    recorder.remove()
    assert recorder.batch_norm == {"1": (4, True), "2": (4, False)}
    ctx = EarlyAlerts().engine.context()
    at = Snapshot(step=0, epoch=0)
    on_two = check_batch_norm(ctx, at, recorder.batch_norm, world_size=2)
    assert [(a.module, a.value) for a in on_two] == [("2", 4.0)]  # synced: 8 samples, not small
    on_one = check_batch_norm(ctx, at, recorder.batch_norm, world_size=1)
    assert [a.extra["modules"] for a in on_one] == [["1", "2"]]  # one process: both are small
