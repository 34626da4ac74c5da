"""The direct cost of callbacks: the time spent inside them, per training step.

Whole fits of a small model differ by hundreds of microseconds per step from one fit to the next
on a shared machine, even side by side (its speed drifts, and each fit lays its memory out anew),
so a few microseconds of callback work cannot be read from step-time differences alone. The
clock here reads the callbacks' own time, within the step, at microsecond resolution:

- their Lightning hooks, bracketed by an :class:`Open` and a :class:`Close` callback placed right
  before and after them in the callback list; what an empty bracket right after reads is
  subtracted, so what remains is Lightning's dispatch of the watched callbacks plus their work
  (an empty bracket before them soaks up the cold start of each hook's dispatch, which a bare run
  pays at its own first callback; where the brackets sit still moves the figure by about ±15 µs);
- the module and optimizer hooks ``lightning_watch`` registers, timed call by call (:func:`timed_hooks`).

It does not see indirect costs (memory held, caches evicted, a writer thread's share of the
CPU), which the step-time comparisons of ``step_cost.py`` and ``overhead.py`` include: the
direct figure is a floor of what a user pays, resolved to the microsecond.

Usage (in a benchmark)::

    clock = DirectClock()
    with timed_hooks():
        Trainer(callbacks=[*bracketed(watched, clock), ...]).fit(model, data)
    clock.seconds  # per training step
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time

import lightning.pytorch as pl
import torch
from torch import nn

#: the callback hooks Lightning calls on every training batch (automatic optimization)
BATCH_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
               "on_before_zero_grad", "on_train_batch_end")  # fmt: skip


class DirectClock:
    """Seconds spent per step inside the watched callbacks (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []  # per step
        self.hook_calls: list[int] = []  # lightning_watch module/optimizer hook calls per step
        self.opened: dict[tuple[str, bool], float] = {}  # (hook, floor) -> perf_counter at its Open
        self.inside = False  # inside a bracket: hook calls are counted by the bracket already

    def add_hook(self, seconds: float) -> None:
        if self.seconds and not self.inside:
            self.seconds[-1] += seconds
            self.hook_calls[-1] += 1


class Open(pl.Callback):
    """Opens a bracket at every batch hook (``floor``: the empty bracket whose reading is subtracted;
    ``warmup``: an empty bracket whose reading is dropped)."""

    def __init__(self, clock: DirectClock, floor: bool = False, warmup: bool = False) -> None:
        self.clock, self.floor, self.warmup = clock, floor, warmup


class Close(pl.Callback):
    def __init__(self, clock: DirectClock, floor: bool = False, warmup: bool = False) -> None:
        self.clock, self.floor, self.warmup = clock, floor, warmup


def _open(hook: str):
    def opened(self: Open, *args) -> None:
        if self.warmup:
            if hook == "on_train_batch_start":  # the first bracket of a step opens its entry
                self.clock.seconds.append(0.0)
                self.clock.hook_calls.append(0)
            return
        self.clock.inside = not self.floor
        self.clock.opened[hook, self.floor] = time.perf_counter()

    return opened


def _close(hook: str):
    def closed(self: Close, *args) -> None:
        if self.warmup:
            return
        elapsed = time.perf_counter() - self.clock.opened[hook, self.floor]
        if self.clock.seconds:
            self.clock.seconds[-1] += -elapsed if self.floor else elapsed
        self.clock.inside = False

    return closed


for _hook in BATCH_HOOKS:
    setattr(Open, _hook, _open(_hook))
    setattr(Close, _hook, _close(_hook))


#: the clock of the fit running in this thread (a lock-step pair runs two fits in two threads)
_CURRENT = threading.local()


@contextlib.contextmanager
def timed_hooks():
    """Time every call of the module and optimizer hooks ``lightning_watch`` registers while inside,
    on the clock of the fit of the thread that registered them."""
    targets = [
        (nn.Module, "register_forward_hook"),
        (nn.Module, "register_forward_pre_hook"),
        (nn.Module, "register_full_backward_hook"),
        (torch.Tensor, "register_hook"),
        (torch.optim.Optimizer, "register_step_pre_hook"),
        (torch.optim.Optimizer, "register_step_post_hook"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]

    def wrapping(register):
        def register_timed(self, hook, *args, **kwargs):
            if not str(getattr(hook, "__module__", "")).startswith("lightning_watch"):
                return register(self, hook, *args, **kwargs)

            clock: DirectClock = _CURRENT.clock

            @functools.wraps(hook)
            def timed(*hook_args, **hook_kwargs):
                start = time.perf_counter()
                try:
                    return hook(*hook_args, **hook_kwargs)
                finally:
                    clock.add_hook(time.perf_counter() - start)

            return register(self, timed, *args, **kwargs)

        return register_timed

    for owner, name, register in originals:
        setattr(owner, name, wrapping(register))
    try:
        yield
    finally:
        for owner, name, register in originals:
            setattr(owner, name, register)


def bracketed(watched: list[pl.Callback], clock: DirectClock) -> list[pl.Callback]:
    """``watched`` between the brackets of ``clock``, then the empty bracket whose reading is subtracted."""
    _CURRENT.clock = clock  # the module and optimizer hooks registered in this thread report to it
    # Two empty brackets: the first one only soaks up what the first callback of a hook pays after a
    # long stretch of model code (Lightning's dispatch code cold in the CPU's caches), which a bare run
    # pays too, at its own first callback; the second, warm like the watched bracket, is the one
    # subtracted. (Measured: with the subtracted bracket first, an empty callback read 0 µs on the
    # small GPT and 18 µs on the tiny MLP; with it last and nothing before, 68 and 44 µs.)
    return [Open(clock, warmup=True), Close(clock, warmup=True), Open(clock), *watched, Close(clock),
            Open(clock, floor=True), Close(clock, floor=True)]  # fmt: skip
