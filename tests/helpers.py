"""What the tests share: tiny models and data, a quiet Trainer, plain-PyTorch recorders, event-file readers.

Imported as ``from helpers import ...`` (``tests/`` is on ``sys.path`` through its root ``conftest.py``);
the DDP tests' spawned workers import it the same way.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch.snapshot import parse_tag

os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class TinyRegressor(pl.LightningModule):
    """A small MLP regressor; ``net`` is an ``nn.Sequential`` the tests can reach into."""

    def __init__(self, net: nn.Module | None = None, lr: float = 0.1, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net if net is not None else nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.lr = lr
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_loader(n: int = 64, in_features: int = 4, batch_size: int = 16, seed: int = 0, shuffle: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def join_two_process_group(rank: int, port: int) -> None:
    """Environment of rank ``rank`` of a 2-process CPU group on loopback, as torchrun would set it.

    DDP tests start their two processes themselves (``torch.multiprocessing.spawn``) and run
    Lightning's ``strategy="ddp"`` inside: one start serves several fits, and it avoids the rare
    exit aborts seen with ``ddp_spawn`` on this machine.
    """
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)


def make_trainer(tmp_path: Path, callbacks, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer writing TensorBoard logs under ``tmp_path``."""
    defaults = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": str(tmp_path),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "logger": pl.loggers.TensorBoardLogger(str(tmp_path), name="tb"),
    }
    defaults.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.Trainer(callbacks=callbacks, **defaults)


def legacy_tag(tag: str) -> str:
    """``watch.grad_norm/01.net.0`` -> ``watch/grad_norm/net.0`` (tests name layers without their index)."""
    parsed = parse_tag(tag)
    if parsed is None:
        return tag
    return f"watch/{parsed[0]}/{parsed[1]}" if parsed[1] is not None else f"watch/global/{parsed[0]}"


def read_scalars(log_dir: str | Path, raw: bool = False) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``log_dir``, read with TensorBoard's own reader.

    Our tags come back spelled ``watch/<metric>/<module>`` and ``watch/global/<metric>`` (via
    :func:`~lightning_watch.snapshot.parse_tag`), so tests name a layer without its position index;
    ``raw=True`` gives the tags as written (tests/test_tag_layout.py checks those).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag if raw else legacy_tag(tag), []).extend((e.step, e.value) for e in acc.Scalars(tag))
        break  # one run directory per test
    # A Trainer fitted twice writes two event files into one directory, and TensorBoard loads them
    # in name order: `...<second>.<host>.<pid>.10` sorts before `....9` within one second.
    return {tag: sorted(points, key=lambda point: point[0]) for tag, points in out.items()}


def read_points(log_dir: str | Path) -> dict[tuple[str, int], list[float]]:
    """Every scalar point written under ``log_dir``: ``(tag, step) -> values`` (all event files, duplicates kept).

    Tags are spelled as by :func:`read_scalars` (``watch/<metric>/<module>``).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[tuple[str, int], list[float]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                points.setdefault((legacy_tag(tag), event.step), []).append(event.value)
    return points


# ---------------------------------------------------------------------- running
def quiet(call, *args, **kwargs):
    """``call(*args, **kwargs)`` with Lightning's advice warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def quiet_fit(trainer: pl.Trainer, model: pl.LightningModule, *loaders, seed: int | None = None, **kwargs) -> None:
    """``trainer.fit(model, *loaders, **kwargs)`` quietly, after ``seed_everything(seed)`` when given."""
    if seed is not None:
        pl.seed_everything(seed, verbose=False)
    quiet(trainer.fit, model, *loaders, **kwargs)


# ---------------------------------------------------------------------- hooks left behind
def hook_count(model: nn.Module) -> int:
    """Forward hooks registered on ``model``'s modules now."""
    return sum(len(m._forward_hooks) for m in model.modules())


def leftover_hooks(model: nn.Module, trainer: pl.Trainer | None = None) -> int:
    """Hooks of any kind still registered on ``model`` (and on the trainer's optimizers), plus its capture engine."""
    from lightning_watch.capture import CaptureEngine

    count = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )
    count += sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    if trainer is not None:
        count += sum(len(opt._optimizer_step_post_hooks) for opt in trainer.optimizers)
    return count + (model in CaptureEngine._engines)


class CountHooks(Callback):
    """Forward hooks registered while each training batch runs (read at the optimizer step)."""

    def __init__(self) -> None:
        self.during: list[int] = []

    @property
    def most(self) -> int:
        return max(self.during, default=0)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.during.append(hook_count(pl_module))


# ---------------------------------------------------------------------- plain-PyTorch references
def lightning_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs at: optimizer-stepping batches so far."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


class StoreOutputs(Callback):
    """Reference: every output of the named modules during training batches, per Lightning step.

    A plain forward hook per module, installed at each batch start and removed at its end; tuple
    outputs (RNNs, attention) store their first element. Outputs are kept as float64 copies.
    """

    def __init__(self, names: Iterable[str] | str) -> None:
        self.names = [names] if isinstance(names, str) else list(names)
        self.outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._handles: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        modules = dict(pl_module.named_modules())
        step = lightning_step(trainer)
        for name in self.names:
            self._handles.append(modules[name].register_forward_hook(self._store(name, step)))

    def _store(self, name: str, step: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.outputs.setdefault((name, step), []).append(out.detach().double().clone())

        return hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def window(self, name: str, steps: Iterable[int]) -> torch.Tensor:
        """Every output of ``name`` at ``steps``, flattened into one float64 vector."""
        return torch.cat([o.reshape(-1) for s in steps for o in self.outputs[(name, s)]])

    def dead_fraction(self, name: str, steps: Iterable[int], unit_dim: int) -> float:
        """Fraction of units (along ``unit_dim``) of ``name`` that never fired (> 0) at ``steps``."""
        alive = None
        for step in steps:
            for out in self.outputs[(name, step)]:
                fired = (out.movedim(unit_dim, 0).reshape(out.shape[unit_dim], -1) > 0).any(dim=1)
                alive = fired if alive is None else alive | fired
        return 1.0 - alive.double().mean().item()


class RecordInputs(Callback):
    """Weights at the start of each batch and the batch itself, keyed by Lightning's step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: dict[int, list] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = lightning_step(trainer)
        if step not in self.weights:  # the first micro-batch of an accumulation cycle
            self.weights[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.batches.setdefault(step, []).append([t.clone() for t in batch])


def reference_grads(net: nn.Module, recorder: RecordInputs, step: int) -> dict[str, torch.Tensor]:
    """Plain PyTorch: the gradient Lightning's optimizer step sees (mean loss over micro-batches)."""
    ref = copy.deepcopy(net)
    ref.load_state_dict({k.removeprefix("net."): v for k, v in recorder.weights[step].items()})
    batches = recorder.batches[step]
    for x, y in batches:
        (nn.functional.mse_loss(ref(x), y) / len(batches)).backward()
    return {f"net.{name}": p.grad for name, p in ref.named_parameters()}


class RecordGrads(Callback):
    """Reference: copies of every gradient right before the optimizer step (pre-clip) and after it."""

    def __init__(self) -> None:
        self.pre, self.post, self.before, self.after = [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.post.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def norm(tensors) -> float:
    """The L2 norm of several tensors taken together, in float64."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def module_norm(grads: dict[str, torch.Tensor], module: str) -> float:
    """``norm`` of the entries of ``grads`` that belong directly to ``module``."""
    return norm([g for name, g in grads.items() if name.rpartition(".")[0] == module])


# ---------------------------------------------------------------------- bare vs watched (robustness tests)
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def all_hook_count(model: nn.Module) -> int:
    """Every module hook and every parameter hook registered on ``model``."""
    total = sum(len(getattr(m, d, {})) for m in model.modules() for d in HOOK_DICTS)
    total += sum(len(p._backward_hooks or {}) for p in model.parameters() if hasattr(p, "_backward_hooks"))
    return total


def sq(t: torch.Tensor) -> float:
    """Plain-PyTorch squared L2 norm (of ``|z|`` for complex ``t``), in float64."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return float(torch.linalg.vector_norm(t.to(torch.complex128 if t.is_complex() else torch.float64)) ** 2)


class Recorder(Callback):
    """Losses and, per Lightning step, each distinct parameter's gradient and weights (plain PyTorch).

    ``grads[step][name]`` is the squared gradient norm the optimizer step sees; ``before``/``after``
    the weights around the step (float64 copies), keyed by the first name of each parameter.
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: dict[int, dict[str, float]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: dict[int, list] = {}

    @staticmethod
    def _step(trainer) -> int:
        return trainer.fit_loop.epoch_loop._batches_that_stepped

    @staticmethod
    def _params(module) -> dict[str, nn.Parameter]:
        return dict(module.named_parameters())  # distinct parameters, first name of a tied one

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.setdefault(self._step(trainer), []).append([t.detach().clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = self._step(trainer)
        params = self._params(pl_module)
        self.grads[step] = {n: sq(p.grad) for n, p in params.items() if p.grad is not None}
        self.before[step] = {n: _full(p).clone() for n, p in params.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))
        step = self._step(trainer)  # the counter advances after this hook
        self.after[step] = {n: _full(p).clone() for n, p in self._params(pl_module).items()}

    def update(self, step: int, names) -> float:
        return math.sqrt(sum(sq(self.after[step][n] - self.before[step][n]) for n in names))

    def weight(self, step: int, names) -> float:
        return math.sqrt(sum(sq(self.before[step][n]) for n in names))

    def grad(self, step: int, names) -> float:
        return math.sqrt(sum(self.grads[step][n] for n in names if n in self.grads[step]))


def _full(p: torch.Tensor) -> torch.Tensor:
    t = p.detach()
    if hasattr(t, "full_tensor"):  # a DTensor: the reference gathers, the monitors must not
        t = t.full_tensor()
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def fit_bare_and_watched(
    tmp_path: Path,
    make_model: Callable[[], pl.LightningModule],
    make_loader: Callable[[], object],
    watch_factory: Callable[[], Callback],
    **trainer_kwargs,
):
    """Fit a fresh model twice from one seed, without and with ``watch_factory()``.

    Returns ``(bare Recorder, watched Recorder, scalars logged by the watched run, watched model,
    warnings raised during the watched fit)``.
    """
    out = []
    for watched in (False, True):
        torch.manual_seed(0)
        model = make_model()
        recorder = Recorder()
        callbacks = [recorder] + ([watch_factory()] if watched else [])
        recorder.watch = callbacks[-1] if watched else None  # the Watch, for its last snapshot
        root = tmp_path / ("watched" if watched else "bare")
        trainer = make_trainer(root, callbacks, **trainer_kwargs)
        torch.manual_seed(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, make_loader())
        out.append((recorder, model, trainer, caught))
    (bare, _, _, _), (rec, model, trainer, caught) = out
    scalars = read_scalars(trainer.logger.log_dir) if trainer.logger is not None else {}
    return bare, rec, scalars, model, caught


def last(scalars: dict, tag: str) -> tuple[int, float]:
    """Step and value of the last point of ``tag``."""
    assert tag in scalars, f"{tag} not logged; have {sorted(t for t in scalars if 'global' in t)[:20]}"
    return scalars[tag][-1]
