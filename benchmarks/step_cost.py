"""What does watching add to each training step? Extra microseconds per plain, sampled and logging step.

On a GPU a step of a small model is often 2-10 ms of Python and kernel launches, so what callbacks add
*per step* is the overhead users feel. This benchmark measures it on two launch-bound models:

    mlp   MLP 32-64-64-10, batch 64 (bare Lightning step ~1.7 ms on 2 CPU cores)
    gpt   a small GPT-style decoder: 2 blocks, 4 heads, width 64, context 32, vocabulary 256, batch 8
          (tied embeddings, causal attention, GELU MLPs: the module zoo of a language model, launch-bound)
    gpt-medium  the same at a size GPU users run (6 blocks, width 512, context 256, batch 16; not in
          the default set: meant for ``--device cuda``)

Method. Every run is a real ``lightning.pytorch.Trainer`` fit of ``--steps`` steps on in-memory batches
(already on the device) with a fresh model of the same seed. A tiny timing callback is installed FIRST
and LAST in the callback list of every run (bare ones too): its ``on_train_batch_start`` (first) and
``on_train_batch_end`` (last) bracket each step with ``time.perf_counter``, so a step's time holds the
forward, backward, optimizer and every callback's per-step work.

The per-step figures come from *lock-step* pairs: a bare fit and a watched fit run at once in two
threads of one process, taking turns one step each (bare step k, watched step k, bare step k+1, ...),
so each watched step is timed within milliseconds of its bare twin. A shared machine's speed drifts
by tens of percent over seconds (measured here: a fixed Python loop took 35 to 64 ms from one fit to
the next), which swamps a few microseconds when whole fits are compared; paired neighbouring steps
cancel that drift, though not each fit's own speed (its memory laid out anew: still hundreds of
microseconds per step on the tiny model, hence the direct cost below).
Each step is classified by the watched run's cadence (``lightning_watch.cadence``):
*logging* when ``(step + 1) % log == 0``, *sampled* when ``(step + 1) % sample == 0`` (and not
logging), *plain* otherwise; the first ``--warmup`` steps are left out of the per-step figures. A
class's extra is the median over its steps of (watched step - bare twin); the table shows the median
over rounds with min-max. One round also runs each configuration in a whole fit of its own, after a
bare one (bare, A, bare, B, ...), for the fixed costs and the whole-run ratio.

Also shown: *mean extra* (mean over all steps of the lock-step pair, warm-up included: what the
sampled and logging steps add on average), *end of fit* (extra seconds from the last step's end to
``fit()`` returning: report, pictures, files) and the *whole-run* ratio (wall time of the whole
``fit()``, over the bare run's).

*Direct cost* (``direct_cost.py``): the microseconds spent inside the watched callbacks per step,
read within the step itself, which resolves what step-time differences cannot: whole fits of the
tiny model differ by hundreds of microseconds per step from one fit to the next, even side by side
in lock-step. It is read in the fit of its own (the one for the fixed costs), as a user's fit runs:
in a lock-step pair every step follows the other thread's step, in caches the other model filled,
and the clock read up to twice as much on the plain steps, with more scatter. It is a floor
(indirect costs are not in it); the paired figures bound it from above, with their noise shown.

*Fit length* (``--long-steps N [N ...]``): one more fit of each length per round and configuration,
after a bare one: its mean direct cost per step and whole-run ratio. ``Watch()``'s time budget
(``lightning_watch/pace.py``) keeps the default cadence for the first four logging windows and
stretches it after them when measuring takes more than 2 % of the time, so a short fit shows the
full cadence's cost and a long one what the budget holds it to; several lengths show the curve
between the two.

With ``--device cuda`` the host's clock is read after ``torch.cuda.synchronize()`` only around the timed
regions: before and after each ``fit()``; never inside the callbacks, which would add the very syncs
being measured. Per-step figures are then host-side (launch) times, which is what a launch-bound step
costs; the whole-run ratio covers the device's work too.

Usage:
    python benchmarks/step_cost.py                     # both models, 5 rounds of 100 steps
    python benchmarks/step_cost.py --quick             # 2 rounds of 60 steps (a smoke run)
    python benchmarks/step_cost.py --models mlp --long-steps 200 500 1000   # and fits of these lengths
    python benchmarks/step_cost.py --device cuda --out step_cost.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from unittest import mock

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightning_watch import GradientNormMonitor, Watch
from lightning_watch.cadence import Cadence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from direct_cost import DirectClock, bracketed, timed_hooks


# ---------------------------------------------------------------------- models
class TinyMLP(pl.LightningModule):
    """MLP 32-64-64-10 (ReLU), cross-entropy, SGD: a step is mostly Python and kernel launches."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention then a GELU MLP, both residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(self.act(self.fc(self.ln2(x))))


class TinyGPT(pl.LightningModule):
    """A small GPT-style language model (token + position embeddings, decoder blocks, tied head)."""

    def __init__(self, vocab: int = 256, context: int = 32, width: int = 64, heads: int = 4, depth: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2

    def training_step(self, batch, batch_idx):
        idx, targets = batch
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


def mlp_batches(steps: int, device: str) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(64, 32, generator=g).to(device), torch.randint(0, 10, (64,), generator=g).to(device))
            for _ in range(steps)]  # fmt: skip


def gpt_batches(steps: int, device: str) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        seq = torch.randint(0, 256, (8, 33), generator=g)  # (B, T + 1): inputs and next-token targets
        out.append((seq[:, :-1].to(device), seq[:, 1:].to(device)))
    return out


def gpt_medium_batches(steps: int, device: str) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        seq = torch.randint(0, 8192, (16, 257), generator=g)
        out.append((seq[:, :-1].to(device), seq[:, 1:].to(device)))
    return out


MODELS: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[int, str], list]]] = {
    "mlp": (TinyMLP, mlp_batches),
    "gpt": (TinyGPT, gpt_batches),
    # a GPU-sized GPT (6 blocks, width 512, context 256, vocabulary 8192, batch 16): a step of a
    # few milliseconds on a data-center GPU, for `--device cuda` (minutes per step on 2 CPU cores)
    "gpt-medium": (lambda: TinyGPT(vocab=8192, context=256, width=512, heads=8, depth=6), gpt_medium_batches),
}

#: configuration name -> the callbacks it adds (None: bare Lightning)
CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "bare": list,
    "Watch()": lambda: [Watch()],
    "Watch(alerts=False, pictures=False, report=False)": lambda: [Watch(alerts=False, pictures=False, report=False)],
    "gradients only": lambda: [GradientNormMonitor()],
    # the floor of any callback: Lightning's dispatch of its hooks, which do nothing
    "empty callback": lambda: [pl.Callback()],
}


# ---------------------------------------------------------------------- timing
class OpCount(TorchDispatchMode):
    """Counts the tensor operations PyTorch dispatches in each step (``step``: the step's position in the
    fit, -1 between steps). A count has no noise: on a GPU each operation that runs a kernel is a launch."""

    def __init__(self) -> None:
        super().__init__()
        self.step = -1
        self.per_step: collections.Counter[int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.per_step[self.step] += 1
        return func(*args, **(kwargs or {}))


class StepStart(pl.Callback):
    """First in the callback list: stamps each step's start, and the watched cadence's intervals then
    (``Watch()``'s time budget may stretch them during the fit: lightning_watch/pace.py)."""

    def __init__(self, watched: list[pl.Callback] = (), ops: OpCount | None = None) -> None:
        self.starts: list[float] = []
        self.steps: list[int] = []
        self.intervals: list[tuple[int, int]] = []
        self._watched = list(watched)
        self._cadence: Cadence | None = None
        self._ops = ops

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._ops is not None:
            self._ops.step = len(self.starts)
        self.steps.append(trainer.fit_loop.epoch_loop._batches_that_stepped)  # Lightning's logging step
        if self._cadence is None:
            self._cadence = _cadence(self._watched) or Cadence.resolve(_TrainerLike(), None, None)
        self.intervals.append((self._cadence.log, self._cadence.sample))
        self.starts.append(time.perf_counter())


class StepEnd(pl.Callback):
    """Last in the callback list: stamps each step's end (then hands the turn over, in a lock-step pair)."""

    def __init__(self, turn: Turn | None = None, ops: OpCount | None = None) -> None:
        self.ends: list[float] = []
        self.turn = turn
        self._ops = ops

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        if self._ops is not None:
            self._ops.step = -1  # the loop between steps, and the end of fit
        if self.turn is not None:
            self.turn.hand_over()


class LockStep:
    """Two fits in two threads taking turns one training step each; a finished fit stops waiting its partner."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._turn = 0
        self._done = [False, False]
        self.waited = [0.0, 0.0]  # seconds each side spent waiting for its turn

    def wait(self, who: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == who or self._done[1 - who])

    def hand_over(self, who: int) -> None:
        with self._cond:
            self._turn = 1 - who
            self._cond.notify_all()
            since = time.perf_counter()
            self._cond.wait_for(lambda: self._turn == who or self._done[1 - who])
            self.waited[who] += time.perf_counter() - since

    def finish(self, who: int) -> None:
        with self._cond:
            self._done[who] = True
            self._turn = 1 - who
            self._cond.notify_all()


@dataclass
class Turn:
    """One fit's side of a :class:`LockStep`."""

    lock: LockStep
    who: int

    def hand_over(self) -> None:
        self.lock.hand_over(self.who)


_OWN = threading.local()  # this thread's side of a lock-step pair, if any


def own_clock() -> float:
    """``time.perf_counter`` less the time this thread waited for its partner's steps.

    ``Watch()``'s time budget reads the clock between batches (lightning_watch/pace.py); in a
    lock-step pair that span holds the bare twin's step too, which would halve the share it sees.
    The benchmark hands it this clock, so it paces itself as it would alone.
    """
    turn = getattr(_OWN, "turn", None)
    now = time.perf_counter()
    return now - turn.lock.waited[turn.who] if turn is not None else now


@dataclass
class Run:
    """One fit: per-step seconds, the cadence of its watch (if any) and its fixed costs."""

    steps: list[int]
    times: list[float]
    wall: float  # the whole fit()
    start: float  # fit() call to the first step's start
    end: float  # last step's end to fit() return
    intervals: list[tuple[int, int]] = field(default_factory=list)  # (log, sample) at each step
    direct: list[float] = field(default_factory=list)  # seconds per step inside the watched callbacks
    hook_calls: list[int] = field(default_factory=list)  # their module/optimizer hook calls per step
    ops: list[int] = field(default_factory=list)  # tensor operations per step (a counted fit only)


def _cadence(callbacks: list[pl.Callback]) -> Cadence | None:
    for cb in callbacks:
        for monitor in [*getattr(cb, "monitors", ()), cb]:
            cadence = getattr(monitor, "_cadence", None)
            if isinstance(cadence, Cadence):
                return cadence
    return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fit_once(
    model_name: str, config: str, steps: int, device: str, root: str, turn: Turn | None = None, count: bool = False
) -> Run:
    """One fit of ``config`` (``count``: every tensor operation counted, per step; not for timing)."""
    make_model, _ = MODELS[model_name]
    batches = BATCHES[(model_name, steps, device)]
    torch.manual_seed(0)
    model = make_model()
    watched = CONFIGS[config]()
    ops = OpCount() if count else None
    start, end, clock = StepStart(watched, ops), StepEnd(turn, ops), DirectClock()
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=1,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=pl.loggers.TensorBoardLogger(root, name=model_name),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[start, *bracketed(watched, clock), end],
    )
    sync(device)
    begin = time.perf_counter()
    with ops if ops is not None else contextlib.nullcontext():
        trainer.fit(model, batches)
    sync(device)
    done = time.perf_counter()
    times = [e - s for s, e in zip(start.starts, end.ends)]
    return Run(
        steps=start.steps,
        times=times,
        wall=done - begin,
        start=start.starts[0] - begin,
        end=done - end.ends[-1],
        intervals=start.intervals,
        direct=clock.seconds,
        hook_calls=clock.hook_calls,
        ops=[ops.per_step[i] for i in range(len(times))] if ops is not None else [],
    )


def lock_step(model_name: str, config: str, steps: int, device: str, root: str) -> tuple[Run, Run]:
    """A bare fit and a ``config`` fit taking turns one step each (see the module docstring): (bare, watched)."""
    lock = LockStep()
    runs: list[Run | None] = [None, None]
    errors: list[BaseException] = []

    def side(who: int, name: str) -> None:
        try:
            _OWN.turn = Turn(lock, who)
            lock.wait(who)
            runs[who] = fit_once(model_name, name, steps, device, root, Turn(lock, who))
        except BaseException as err:  # re-raised in the caller's thread
            errors.append(err)
        finally:
            lock.finish(who)

    threads = [threading.Thread(target=side, args=(who, name)) for who, name in enumerate(("bare", config))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    bare, watched = runs
    assert bare is not None and watched is not None
    return bare, watched


class Batches:
    """The same in-memory batches every epoch (a plain list would read as several dataloaders)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


BATCHES: dict[tuple[str, int, str], Batches] = {}


# ---------------------------------------------------------------------- statistics
def describe(run: Run) -> str:
    """``log every 50, sample every 10`` (and ``then 400/80 from step s`` where the time budget stretched them)."""
    (log, sample), text = run.intervals[0], []
    text.append(f"log every {log}, sample every {sample}")
    for step, now in zip(run.steps, run.intervals):
        if now != (log, sample):
            log, sample = now
            text.append(f"then {log}/{sample} from step {step}")
    return ", ".join(text)


def classify(step: int, intervals: tuple[int, int]) -> str:
    """The class of a step under the (log, sample) intervals in force at it."""
    log, sample = intervals
    if (step + 1) % log == 0:
        return "logging"
    if (step + 1) % sample == 0:
        return "sampled"
    return "plain"


def classes(run: Run) -> list[str]:
    return [classify(step, intervals) for step, intervals in zip(run.steps, run.intervals)]


def paired_extra(bare: Run, run: Run, warmup: int) -> dict[str, float]:
    """Per step class: the median of (watched step - its bare twin) over the steps of a lock-step pair."""
    groups: dict[str, list[float]] = {"plain": [], "sampled": [], "logging": []}
    for i, (kind, seconds, twin) in enumerate(zip(classes(run), run.times, bare.times)):
        if i >= warmup or kind == "logging":  # logging steps are few: keep them all
            groups[kind].append(seconds - twin)
    return {name: statistics.median(v) if v else math.nan for name, v in groups.items()}


def direct_per_class(run: Run, warmup: int) -> dict[str, float]:
    """Per step class: the median seconds spent inside the watched callbacks."""
    groups: dict[str, list[float]] = {"plain": [], "sampled": [], "logging": []}
    for i, (kind, seconds) in enumerate(zip(classes(run), run.direct)):
        if i >= warmup or kind == "logging":
            groups[kind].append(seconds)
    return {name: statistics.median(v) if v else math.nan for name, v in groups.items()}


def ops_per_class(bare: Run, run: Run, warmup: int) -> dict[str, float]:
    """Per step class: the median extra tensor operations of ``run`` over ``bare`` (same seed, same batches),
    and ``mean``: the extra operations per step over the whole fit."""
    groups: dict[str, list[int]] = {"plain": [], "sampled": [], "logging": []}
    for i, (kind, ops, twin) in enumerate(zip(classes(run), run.ops, bare.ops)):
        if i >= warmup or kind == "logging":
            groups[kind].append(ops - twin)
    out = {name: statistics.median(v) if v else math.nan for name, v in groups.items()}
    out["mean"] = (sum(run.ops) - sum(bare.ops)) / len(run.ops)
    return out


def plain_median(bare: Run, run: Run, warmup: int) -> float:
    """The bare run's median step over the steps that are plain in ``run``."""
    return statistics.median(t for i, (kind, t) in enumerate(zip(classes(run), bare.times)) if i >= warmup
                             and kind == "plain")  # fmt: skip


@dataclass
class LongFit:
    """One configuration's fits of one other length (``--long-steps``), over the rounds."""

    direct_mean_us: list[float] = field(default_factory=list)
    whole_run_ratio: list[float] = field(default_factory=list)
    cadence: str = ""


@dataclass
class Result:
    model: str
    config: str
    bare_plain_us: list[float] = field(default_factory=list)
    extra_us: dict[str, list[float]] = field(default_factory=lambda: {"plain": [], "sampled": [], "logging": []})
    mean_extra_us: list[float] = field(default_factory=list)
    end_extra_ms: list[float] = field(default_factory=list)
    start_extra_ms: list[float] = field(default_factory=list)
    whole_run_ratio: list[float] = field(default_factory=list)
    cadence: str = ""
    # direct: inside the watched callbacks (DirectClock), per step class and over all steps
    direct_us: dict[str, list[float]] = field(default_factory=lambda: {"plain": [], "sampled": [], "logging": []})
    direct_mean_us: list[float] = field(default_factory=list)
    direct_first_us: list[float] = field(default_factory=list)
    plain_hook_calls: list[int] = field(default_factory=list)
    # fits of other lengths (``--long-steps``), each after a bare one: the time budget acts from the fifth window
    long: dict[int, LongFit] = field(default_factory=dict)
    # tensor operations (one counted fit and its bare twin: a count does not vary from round to round)
    ops: dict[str, float] = field(default_factory=dict)


def spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    values = [v * scale for v in values if math.isfinite(v)]
    if not values:
        return "-"
    med, lo, hi = statistics.median(values), min(values), max(values)
    fmt = f"{{:+.{digits}f}}"
    return f"{fmt.format(med)} ({fmt.format(lo)}..{fmt.format(hi)})"


def ratio_spread(values: list[float]) -> str:
    return f"x{statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})" if values else "-"


def _ops_cell(ops: dict[str, float]) -> str:
    if not ops:
        return "-"
    classes = " / ".join(
        f"{ops[name]:+.0f}" if math.isfinite(ops[name]) else "-" for name in ("plain", "sampled", "logging")
    )
    return f"{classes} ({ops['mean']:+.1f})"


def markdown(results: list[Result], meta: dict) -> str:
    lines = [
        f"Step cost over bare Lightning: {meta['device']}, torch {meta['torch']}, lightning {meta['lightning']}, "
        f"{meta['rounds']} rounds of {meta['steps']} steps, {meta['date']}; median (min..max) over rounds.",
        "",
        "| model | configuration | bare plain step | extra per plain step | extra per sampled step "
        "| extra per logging step | mean extra over all steps | end of fit extra | whole-run ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = [
            r.model,
            f"`{r.config}`",
            f"{statistics.median(r.bare_plain_us):.0f} µs",
            *(f"{spread(r.extra_us[name])} µs" for name in ("plain", "sampled", "logging")),
            f"{spread(r.mean_extra_us)} µs",
            f"{spread(r.end_extra_ms, digits=1)} ms",
            ratio_spread(r.whole_run_ratio),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Direct cost: microseconds per step inside the watched callbacks (their Lightning hooks, an empty "
        "bracket's reading subtracted, and the module/optimizer hooks they registered), in a fit of its own "
        "(not lock-step); median (min..max) over rounds. Tensor ops: the extra operations PyTorch dispatched "
        "per step (median per class, mean over the fit), counted in one more fit and its bare twin.",
        "",
        "| model | configuration | plain step | sampled step | logging step | first step | mean over all steps "
        "| hook calls on plain steps | tensor ops per plain / sampled / logging step (mean) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = [
            r.model,
            f"`{r.config}`",
            *(f"{spread(r.direct_us[name], digits=1)} µs" for name in ("plain", "sampled", "logging")),
            f"{spread(r.direct_first_us)} µs",
            f"{spread(r.direct_mean_us, digits=1)} µs",
            str(max(r.plain_hook_calls, default=0)),
            _ops_cell(r.ops),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.long for r in results):
        lines += [
            "",
            "Fits of other lengths, each of its own after a bare one: the default cadence's time budget "
            "(lightning_watch/pace.py) acts from the fifth logging window on; median (min..max) over rounds.",
            "",
            "| model | configuration | fit length | direct: mean over all steps | whole-run ratio "
            "| cadence at the end |",
            "|---|---|---:|---:|---:|---|",
        ]
        for r in results:
            for steps, fit in sorted(r.long.items()):
                cells = [r.model, f"`{r.config}`", str(steps), f"{spread(fit.direct_mean_us, digits=1)} µs",
                         ratio_spread(fit.whole_run_ratio), fit.cadence]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    cadences = {f"`{r.config}`: {r.cadence}" for r in results}
    lines += ["", "Step classes follow each watched run's cadence: " + "; ".join(sorted(cadences)) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "gpt"])
    parser.add_argument("--configs", nargs="+", choices=[c for c in CONFIGS if c != "bare"],
                        default=[c for c in CONFIGS if c != "bare"])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5, help="first steps of a run left out of the per-step figures")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument(
        "--long-steps",
        type=int,
        nargs="+",
        default=[],
        help="also fits of these lengths per round: the mean direct cost over a fit of each length, where "
        "the default cadence's time budget acts from the fifth window (lightning_watch/pace.py)",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 60 steps: a smoke run")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 60
    bad = [n for n in args.long_steps if n < 1]
    if bad:
        parser.error(f"`--long-steps` takes fit lengths of at least one step, got {bad[0]!r}")
    args.long_steps = sorted(set(args.long_steps))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"`--device` {args.device!r} needs CUDA, which is not available here")
    if args.device not in ("cpu",) and not args.device.startswith("cuda"):
        parser.error(f"`--device` must be cpu or cuda, got {args.device!r}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_watch", "lightning_watch.alerts"):
        logging.getLogger(name).setLevel(logging.ERROR)  # alerts and tips would interleave with the table

    results: list[Result] = []
    # the time budget's clock (lightning_watch/pace.py) without the partner's steps: see own_clock
    with (
        tempfile.TemporaryDirectory() as root,
        timed_hooks(),
        mock.patch("lightning_watch.watch.perf_counter", own_clock),
    ):
        for model in args.models:
            for steps in {args.steps, *args.long_steps}:
                BATCHES[(model, steps, args.device)] = Batches(MODELS[model][1](steps, args.device))
            fit_once(model, "Watch()", args.steps, args.device, root)  # warm-up: discarded
            by_config = {c: Result(model, c) for c in args.configs}
            counted_bare = fit_once(model, "bare", args.steps, args.device, root, count=True)
            for config, r in by_config.items():  # tensor operations: counted once, they do not vary
                r.ops = ops_per_class(counted_bare, fit_once(model, config, args.steps, args.device, root, count=True),
                                      args.warmup)  # fmt: skip
            for round_ in range(args.rounds):
                for config in args.configs:
                    bare, run = lock_step(model, config, args.steps, args.device, root)
                    r = by_config[config]
                    r.cadence = describe(run)
                    r.bare_plain_us.append(plain_median(bare, run, args.warmup) * 1e6)
                    for name, extra in paired_extra(bare, run, args.warmup).items():
                        r.extra_us[name].append(extra * 1e6)
                    r.mean_extra_us.append((statistics.fmean(run.times) - statistics.fmean(bare.times)) * 1e6)
                    # fixed costs, the whole run and the direct cost: fits of their own, each after a bare one
                    # (in a lock-step pair the direct clock reads more, and scatters more: every step there
                    # follows the other thread's step, in caches the other model filled)
                    bare, run = (fit_once(model, c, args.steps, args.device, root) for c in ("bare", config))
                    r.end_extra_ms.append((run.end - bare.end) * 1e3)
                    r.start_extra_ms.append((run.start - bare.start) * 1e3)
                    r.whole_run_ratio.append(run.wall / bare.wall)
                    for name, seconds in direct_per_class(run, args.warmup).items():
                        r.direct_us[name].append(seconds * 1e6)
                    r.direct_mean_us.append(statistics.fmean(run.direct) * 1e6)
                    r.direct_first_us.append(run.direct[0] * 1e6)
                    r.plain_hook_calls.append(sum(n for i, (kind, n) in enumerate(zip(classes(run), run.hook_calls))
                                                  if i >= 1 and kind == "plain"))  # fmt: skip
                    for steps in args.long_steps:  # the budget acts from the fifth window of a longer fit
                        bare, run = (fit_once(model, c, steps, args.device, root) for c in ("bare", config))
                        fit = r.long.setdefault(steps, LongFit())
                        fit.direct_mean_us.append(statistics.fmean(run.direct) * 1e6)
                        fit.whole_run_ratio.append(run.wall / bare.wall)
                        fit.cadence = describe(run)
                print(f"{model}: round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            results += by_config.values()
    threads = f"{args.threads} thread{'s' * (args.threads != 1)}"
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch on {threads})"
    meta = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "rounds": args.rounds,
        "steps": args.steps,
        "long_steps": args.long_steps,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(markdown(results, meta))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    return 0


class _TrainerLike:
    """Lightning's defaults, for a configuration whose callbacks expose no cadence."""

    log_every_n_steps = 50
    fast_dev_run = False


if __name__ == "__main__":
    sys.exit(main())
