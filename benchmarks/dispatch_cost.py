"""What Lightning's dispatch of a callback hook costs, and how many of ``Watch()``'s hooks it calls per batch.

Lightning calls every per-batch hook of every callback on every batch, whether the callback
defines it or not (``lightning.pytorch.trainer.call._call_callback_hooks``: a profiler region, a
name built from ``state_key``, the call). ``lightning_watch.subscription`` shadows the hooks a
callback has no work in with ``None``, which the dispatcher skips. This script measures:

1. *per hook call* (µs, in a tight loop, so a floor: the same code run cold inside a training
   step costs more): the dispatcher with no callback, with an empty ``Callback``, and with that
   callback's hook shadowed;
2. *hook calls per batch* into ``Watch()`` over a fit of the tiny MLP (counted by a Lightning
   profiler, which sees one region per hook call), split into quiet batches and busy ones, with
   shadowing on and off.

Usage:
    python benchmarks/dispatch_cost.py            # 200 000 calls per figure, a 200-step fit
    python benchmarks/dispatch_cost.py --quick
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections import Counter
from unittest import mock

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer import call
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_watch import Watch, subscription
from lightning_watch.cadence import logging_step


class _Empty(Callback):
    pass


def per_hook_call_us(callbacks: list[Callback], calls: int) -> float:
    """µs per ``_call_callback_hooks(trainer, "on_after_backward")`` with these callbacks, hot."""
    trainer = pl.Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy._lightning_module = _Tiny()  # what a fit would have attached
    best = float("inf")
    for _ in range(5):  # the best of five: the machine's speed drifts
        start = time.perf_counter()
        for _ in range(calls // 5):
            call._call_callback_hooks(trainer, "on_after_backward")
        best = min(best, (time.perf_counter() - start) / (calls // 5))
    return best * 1e6


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Counting(PassThroughProfiler):
    """Counts Lightning's calls into ``Watch``, per hook, on quiet and busy batches."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[bool, str]] = Counter()
        self.busy_batch = True

    def start(self, action_name: str) -> None:
        if action_name.startswith("[Callback]Watch"):
            self.calls[(self.busy_batch, action_name.rsplit(".", 1)[1])] += 1


class _Batches(Callback):
    """Marks each batch quiet or busy by the Watch's own fast path, and counts them."""

    def __init__(self, watch: Watch, profiler: _Counting) -> None:
        self.watch, self.profiler = watch, profiler
        self.batches: Counter[bool] = Counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.profiler.busy_batch = logging_step(trainer) >= self.watch._quiet.until

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches[self.profiler.busy_batch] += 1


def calls_per_batch(steps: int, skip: bool) -> dict[str, float]:
    profiler, watch = _Counting(), Watch(pictures=False, report=False)
    batches = _Batches(watch, profiler)
    trainer = pl.Trainer(
        callbacks=[batches, watch],
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        profiler=profiler,
    )
    data = TensorDataset(torch.randn(64 * steps, 32), torch.randint(0, 10, (64 * steps,)))
    with mock.patch.object(subscription, "dispatcher_skips_none", lambda: skip), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Tiny(), DataLoader(data, batch_size=64))
    per_batch = {}
    for busy in (False, True):
        count = sum(n for (b, _), n in profiler.calls.items() if b == busy)
        per_batch["busy" if busy else "quiet"] = count / max(batches.batches[busy], 1)
    per_batch["quiet batches"] = batches.batches[False]
    per_batch["busy batches"] = batches.batches[True]
    return per_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 000 calls per figure, a 100-step fit")
    args = parser.parse_args()
    calls, steps = (20_000, 100) if args.quick else (200_000, 200)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    shadowed = _Empty()
    shadowed.on_after_backward = None  # what lightning_watch.subscription does to a hook with no work
    none, empty, skipped = (per_hook_call_us(cbs, calls) for cbs in ([], [_Empty()], [shadowed]))
    print(f"torch {torch.__version__}, lightning {pl.__version__}; hot loop of {calls} calls, best of 5\n")
    print("| dispatcher of one hook | µs per call | over no callback |")
    print("|---|---:|---:|")
    for name, value in (("no callback", none), ("an empty Callback", empty), ("its hook shadowed", skipped)):
        print(f"| {name} | {value:.2f} | {value - none:+.2f} |")

    print(f"\nLightning's calls into Watch() per batch, tiny MLP, {steps} steps:\n")
    print("| shadowing | calls per quiet batch | calls per busy batch | quiet / busy batches |")
    print("|---|---:|---:|---:|")
    for skip in (False, True):
        row = calls_per_batch(steps, skip)
        print(
            f"| {'on' if skip else 'off'} | {row['quiet']:.2f} | {row['busy']:.2f} "
            f"| {row['quiet batches']} / {row['busy batches']} |"
        )


if __name__ == "__main__":
    main()
