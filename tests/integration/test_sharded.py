"""Sharded parameters (DTensor): FSDP2 through Lightning's ModelParallelStrategy, 2 gloo processes on CPU.

Every monitor works on each rank's local shards: the gradient, weight and update norms logged by
``Watch`` must equal a reference that gathers the whole tensors with ``full_tensor()``; Watch itself
never gathers a parameter, its pre-step copy holds local shards only, and each logging step costs
one collective.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import Recorder, join_two_process_group, legacy_tag, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import Watch, WatchWarning
from lightning_watch.monitors import ParameterDeltaMonitor

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

STEPS, LOG_EVERY = 6, 3
LINEARS = ("net.0", "net.2", "net.4")


class Sharded(pl.LightningModule):
    """Three Linear layers, each fully sharded (FSDP2) over the data-parallel mesh in `configure_model`.

    ``net.4`` (1 x 4 weight, 1 bias) has fewer rows than ranks: rank 1's shards are empty.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * STEPS * 4, 6, generator=g)
    return TensorDataset(x, x[:, :1] * 2 - x[:, 1:2])


class CopyProbe(pl.Callback):
    """Right after the monitors' `on_before_optimizer_step`: what the pre-step copy holds."""

    def __init__(self, deltas: ParameterDeltaMonitor) -> None:
        self.deltas = deltas
        self.copies: list[tuple[bool, int, int]] = []  # (any DTensor, copied elements, local elements)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        before = self.deltas._before
        if before:
            from torch.distributed.tensor import DTensor

            local = sum(p.to_local().numel() for p in pl_module.parameters())
            self.copies.append((any(isinstance(t, DTensor) for t in before), sum(t.numel() for t in before), local))


def _count_gathers(trainer, counts: list[int]):
    """Count the strategy's all-gathers inside each publication of the hub (the one read)."""
    from lightning_watch.hub import StatHub

    original = StatHub.publish
    strategy = trainer.strategy
    gather = strategy.all_gather

    def publish(*args, **kwargs):
        calls = []

        def counting(*a, **k):
            calls.append(1)
            return gather(*a, **k)

        strategy.all_gather = counting
        try:
            return original(*args, **kwargs)
        finally:
            del strategy.all_gather
            counts.append(len(calls))

    StatHub.publish = publish
    return lambda: setattr(StatHub, "publish", original)


def _forbid_gathers_from_watch():
    """Make ``full_tensor``/``redistribute`` called from lightning_watch code fail loudly."""
    from torch.distributed.tensor import DTensor

    saved = {name: getattr(DTensor, name) for name in ("full_tensor", "redistribute")}
    calls: list[str] = []
    package = str(Path(__file__).resolve().parents[1] / "lightning_watch")

    for name, original in saved.items():

        def guarded(self, *a, _original=original, _name=name, **k):
            caller = inspect.stack()[1].filename
            if caller.startswith(package):
                calls.append(f"{_name} from {caller}")
            return _original(self, *a, **k)

        setattr(DTensor, name, guarded)

    def restore():
        for name, original in saved.items():
            setattr(DTensor, name, original)

    return calls, restore


def _model_parallel_fits(out: Path, model_cls, data_parallel: int, tensor_parallel: int, devices: int = 2) -> dict:
    """A bare and a watched fit under ModelParallelStrategy; what each rank saw and logged."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    result: dict = {}
    for watched in (False, True):
        torch.manual_seed(0)
        recorder = Recorder()
        watch = Watch(
            log_every_n_steps=LOG_EVERY, sample_every_n_steps=1, histogram_every_n_steps=LOG_EVERY, pictures=False
        )
        snapshots: list = []
        watch.add_listener(lambda t, m, s, _into=snapshots: _into.append(s))
        callbacks = [recorder] + ([watch, CopyProbe(watch.monitor(ParameterDeltaMonitor))] if watched else [])
        strategy = ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=tensor_parallel)
        # a TensorBoard logger: histograms, text and the report are written from sharded tensors too
        logger = pl.loggers.TensorBoardLogger(str(out), name=str(watched), version=0)
        trainer = make_trainer(
            out / str(watched), callbacks, strategy=strategy, devices=devices, logger=logger, max_steps=STEPS
        )
        counts: list[int] = []
        restore_publish = _count_gathers(trainer, counts)
        gathers, restore_dtensor = _forbid_gathers_from_watch()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer.fit(model_cls(), DataLoader(data(), batch_size=4))
            finally:
                restore_publish()
                restore_dtensor()
        key = "watched" if watched else "bare"
        result[key] = {
            "batches": recorder.batches,
            "losses": recorder.losses,
            "grads": recorder.grads,
            "before": recorder.before,
            "after": recorder.after,
        }
        if watched:
            result.update(
                snapshots=[
                    (s.step, {legacy_tag(k): v for k, v in s.scalars().items()}) for s in snapshots if not s.final
                ],
                gathers_per_publish=counts,
                watch_gathers=gathers,
                copies=callbacks[-1].copies,
                warnings=[str(w.message) for w in caught if issubclass(w.category, WatchWarning)],
                histograms=_histogram_tags(trainer) if trainer.is_global_zero else None,
            )
    return result


def _histogram_tags(trainer) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer.logger.experiment.flush()
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    return acc.Tags()["histograms"]


def _worker(rank: int, out: str, port: int) -> None:
    join_two_process_group(rank, port)
    out = Path(out)
    result: dict = {"rank": rank}
    try:
        result["fsdp2"] = _model_parallel_fits(out / "fsdp2", Sharded, data_parallel=2, tensor_parallel=1)
        result["tp"] = _model_parallel_fits(out / "tp", TensorParallel, data_parallel=1, tensor_parallel=2)
        result["ddp"] = {reinit: _ddp_fit(out / f"ddp{reinit}", rank, reinit) for reinit in (False, True)}
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class TensorParallel(Sharded):
    """Megatron-style pair: ``net.0`` column-wise (weight and bias ``Shard(0)``), ``net.2`` row-wise
    (weight ``Shard(1)``, bias ``Replicate``: both ranks hold all of it, and it must count once)."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
        with torch.no_grad():  # units 0 and 1 (rank 0's column shard) never fire
            self.net[0].bias[:2] = -100.0

    def configure_model(self):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(
            self.net, self.device_mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()}
        )


class Reinit(pl.Callback):
    """A user bug: rank 1 re-initialises ``fc1`` after DDP's start-up broadcast."""

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.fc1.reset_parameters()


class Replicated(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _ddp_fit(out: Path, rank: int, reinit: bool) -> dict:
    torch.manual_seed(0)
    watch = Watch(log_every_n_steps=2, pictures=False)
    snapshots: list = []
    watch.add_listener(lambda t, m, s: s.final or snapshots.append({legacy_tag(k): v for k, v in s.scalars().items()}))
    callbacks = [watch] + ([Reinit()] if reinit else [])
    trainer = make_trainer(out, callbacks, strategy="ddp", devices=2, logger=False, max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Replicated(), DataLoader(data(), batch_size=4))
    return {
        "alerts": [(a.code, a.module, a.severity) for a in watch.alerts],
        "spread": [{k: v for k, v in s.items() if "replica_spread" in k} for s in snapshots],
        "fc1": [float(p.detach().double().sum()) for p in trainer.lightning_module.fc1.parameters()],
    }


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    path = tmp_path_factory.mktemp("fsdp2")
    context = torch.multiprocessing.spawn(_worker, args=(str(path), find_free_network_port()), nprocs=2, join=False)
    deadline = 180.0
    while not context.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for process in context.processes:
                process.kill()
            raise AssertionError("the 2-process FSDP2 group did not finish: a rank hangs in a collective")
    return [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _norm(values: dict, names) -> float:
    return math.sqrt(sum(values[n] for n in names))


def _tensor_norm(tensors: dict, names, other: dict | None = None) -> float:
    total = 0.0
    for n in names:
        t = tensors[n] if other is None else other[n] - tensors[n]
        total += float(t.double().square().sum())
    return math.sqrt(total)


def _check_norms(r0: dict, r1: dict, linears) -> None:
    for result in (r0, r1):
        assert result["watched"]["losses"] == result["bare"]["losses"]  # Watch changed nothing
        assert result["warnings"] == [], result["warnings"]
    snapshots = dict(r0["snapshots"])
    assert sorted(snapshots) == [2, 5]
    # both ranks publish the same reduced values
    assert dict(r1["snapshots"]) == snapshots
    rec = r0["watched"]
    for step, scalars in snapshots.items():
        grads, before, after = rec["grads"][step], rec["before"][step], rec["after"][step]
        assert scalars["watch/global/grad_norm"] == pytest.approx(_norm(grads, list(grads)), rel=1e-5)
        for module in linears:
            names = [f"{module}.weight", f"{module}.bias"]
            assert scalars[f"watch/grad_norm/{module}"] == pytest.approx(_norm(grads, names), rel=1e-5), module
            param = _tensor_norm(before, names)
            update = _tensor_norm(before, names, after)
            assert scalars[f"watch/param_norm/{module}"] == pytest.approx(param, rel=1e-5), module
            assert scalars[f"watch/update_norm/{module}"] == pytest.approx(update, rel=1e-4), module
            assert scalars[f"watch/update_ratio/{module}"] == pytest.approx(update / param, rel=1e-4), module
        everything = list(before)
        ratio = _tensor_norm(before, everything, after) / _tensor_norm(before, everything)
        assert scalars["watch/global/update_ratio"] == pytest.approx(ratio, rel=1e-4)


def test_fsdp2_trains_identically_and_logs_the_full_tensor_norms(sharded_run):
    r0, r1 = (result["fsdp2"] for result in sharded_run)
    _check_norms(r0, r1, LINEARS)
    # activation and dead-unit statistics are reduced over both ranks' samples
    scalars = dict(r0["snapshots"])[5]
    assert 0.0 <= scalars["watch/dead_frac/net.0"] <= 1.0
    assert scalars["watch/act_rms/net.0"] > 0


def test_fsdp2_histograms_are_written_from_local_shards(sharded_run):
    tags = sharded_run[0]["fsdp2"]["histograms"]
    assert "watch_hist/grad/net.0.weight" in tags and "watch_hist/weight/net.0.weight" in tags, tags


def test_tensor_parallel_counts_a_replicated_bias_once(sharded_run):
    r0, r1 = (result["tp"] for result in sharded_run)
    _check_norms(r0, r1, ("net.0", "net.2"))
    # dead units of the ReLU after the column-parallel layer: each rank sees its 4 of the 8 units
    rec = r0["watched"]
    for end, scalars in r0["snapshots"]:
        alive = torch.zeros(8, dtype=torch.bool)
        for step in range(end - LOG_EVERY + 1, end + 1):
            w, b = rec["before"][step]["net.0.weight"], rec["before"][step]["net.0.bias"]
            for x, _ in rec["batches"][step]:
                alive |= ((x.double() @ w.T + b) > 0).any(dim=0)
        assert not alive[:2].any() and alive[2:].all()  # the premise: units 0 and 1 are dead
        assert scalars["watch/dead_frac/net.1"] == pytest.approx(1 - alive.double().mean().item())
    for result in (r0, r1):
        assert result["watch_gathers"] == [] and result["gathers_per_publish"] == [1, 1]


def test_fsdp2_watch_gathers_no_parameter_and_reads_once(sharded_run):
    runs = [result["fsdp2"] for result in sharded_run]
    for result in runs:
        assert result["watch_gathers"] == []  # no full_tensor()/redistribute from lightning_watch
        assert result["gathers_per_publish"] == [1, 1]  # one collective per logging step
        assert result["copies"], "the pre-step copy was taken"
        for any_dtensor, copied, local in result["copies"]:
            assert not any_dtensor and copied == local  # local shards only
    # the shards differ in size: rank 1 holds no row of net.4, rank 0 all of it
    assert runs[0]["copies"][0][2] > runs[1]["copies"][0][2]


def test_ddp_replicas_out_of_sync_raise_an_error_alert(sharded_run):
    r0, r1 = sharded_run
    # the premise: rank 1's fc1 really differs after the broadcast, and only under the bug
    assert r0["ddp"][False]["fc1"] == r1["ddp"][False]["fc1"]
    assert r0["ddp"][True]["fc1"] != r1["ddp"][True]["fc1"]
    for result in (r0, r1):
        healthy, broken = result["ddp"][False], result["ddp"][True]
        assert not [a for a in healthy["alerts"] if a[0] == "replicas_out_of_sync"]
        assert healthy["spread"] == [{}, {}]  # healthy replicas log nothing
        assert ("replicas_out_of_sync", "fc1", "error") in broken["alerts"]
        assert [a[1] for a in broken["alerts"] if a[0] == "replicas_out_of_sync"] == ["fc1"]  # fc2 stays in sync
        assert all(
            set(s) == {"watch/replica_spread/fc1"} and s["watch/replica_spread/fc1"] > 1e-3 for s in broken["spread"]
        )


# ---------------------------------------------------------------------------- 2-D: FSDP x tensor parallel
class TwoD(TensorParallel):
    """Tensor parallel inside each pair of ranks, then fully sharded across the pairs (mixed meshes)."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        super().configure_model()
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def _worker_2d(rank: int, out: str, port: int) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="4", RANK=str(rank), LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )  # fmt: skip
    torch.set_num_threads(1)
    out = Path(out)
    try:
        result = _model_parallel_fits(out / "2d", TwoD, data_parallel=2, tensor_parallel=2, devices=4)
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_fsdp_x_tensor_parallel_on_four_processes(tmp_path):
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    context = torch.multiprocessing.spawn(
        _worker_2d, args=(str(tmp_path), find_free_network_port()), nprocs=4, join=False
    )
    deadline = 300.0
    while not context.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for process in context.processes:
                process.kill()
            raise AssertionError("the 4-process group did not finish: a rank hangs in a collective")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    _check_norms(ranks[0], ranks[3], ("net.0", "net.2"))
    for result in ranks:
        assert result["watch_gathers"] == [] and result["gathers_per_publish"] == [1, 1]
        assert dict(result["snapshots"]) == dict(ranks[0]["snapshots"])
