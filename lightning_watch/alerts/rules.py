"""Built-in alert rules: pure functions of the logging-step snapshots.

A rule is any callable ``rule(snapshot, context) -> iterable of Alert``. It sees the current
:class:`~lightning_watch.snapshot.Snapshot` (plain floats, identical on every rank) and a
:class:`RuleContext` (earlier snapshots, module forward order, the initial loss, its settings).
It must not touch device tensors: rules run after the one read of the logging step and add no
host sync. A rule may carry a ``codes`` attribute (the codes it can produce), so that an alert
it stops producing is considered cleared and re-raised if it comes back.

Every built-in rule reads its numbers from ``context.settings`` (defaults in :data:`DEFAULTS`).
Conditions that must hold "for several logging steps" re-evaluate the same condition over
``context.history``: the rules themselves keep no state, so a checkpoint of the history is a
checkpoint of every rule.

Example, a user rule:
    >>> from lightning_watch.alerts import Alert
    >>> def too_slow(snapshot, context):
    ...     ratio = snapshot.get("update_ratio")
    ...     if ratio < 1e-4:
    ...         yield context.alert("slow_learning", snapshot, None, ratio, 1e-4,
    ...                             "Weights move slowly.", "Raise the learning rate.")
    >>> too_slow.codes = ("slow_learning",)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_watch.alerts.alert import Alert, AlertCode
from lightning_watch.snapshot import Snapshot

Rule = Callable[[Snapshot, "RuleContext"], Iterable[Alert]]

#: Default settings of every built-in code. ``threshold`` is the evidence bound; ``patience`` the
#: number of consecutive logging steps the condition must hold (see the README table for sources).
DEFAULTS: dict[str, dict[str, float]] = {
    AlertCode.NON_FINITE_LOSS: {"threshold": 0.0},
    AlertCode.NON_FINITE_GRADIENTS: {"threshold": 0.0},
    AlertCode.EXPLODING_GRADIENTS: {"threshold": 1e3, "growth": 10.0, "patience": 1},
    AlertCode.VANISHING_GRADIENTS: {"threshold": 1e-3, "first_norm": 1e-4, "patience": 2},
    AlertCode.DEAD_UNITS: {"threshold": 0.7, "patience": 2},
    AlertCode.SATURATED_UNITS: {"threshold": 0.5, "patience": 2},
    AlertCode.ACTIVATION_EXPLOSION: {"threshold": 100.0, "patience": 2},
    AlertCode.STALLED_PARAMETERS: {"threshold": 0.0, "patience": 2, "min_grad_ratio": 1e-6},
    # 0.05: a relative step 50x the ~1e-3 rule of thumb (Karpathy, CS231n "ratio of updates to weights").
    # Some published recipes take such steps and train well: pytorch/examples word_language_model (SGD lr 20,
    # clip 0.25) moves its weights 5-15 % a step while its loss falls fast. So large steps are a fault only
    # while the loss makes no progress: not once it fell by ``falling`` (share of its magnitude) over the
    # windows of large steps, nor below ``converged`` x the initial loss (the tiny_updates criterion).
    AlertCode.LARGE_UPDATES: {"threshold": 0.05, "patience": 2, "falling": 0.1, "converged": 0.5},
    AlertCode.TINY_UPDATES: {"threshold": 1e-5, "patience": 3, "converged": 0.5},
    AlertCode.LOSS_PLATEAU: {"threshold": 0.05, "min_steps": 200},
    AlertCode.LOSS_DIVERGENCE: {"threshold": 2.0, "min_rise": 0.1, "patience": 1},
    AlertCode.UNSHUFFLED_DATA: {"threshold": 4},
    AlertCode.BATCH_MIXING: {"threshold": 1e-4},
    AlertCode.SMALL_BATCH_NORM: {"threshold": 8},
    AlertCode.UNSEEDED_RUN: {"threshold": 0.0},
    # relative spread of a layer's parameter checksum across data-parallel replicas: replicas
    # stepped by the same averaged gradients are bitwise equal, so any real spread is a bug
    AlertCode.REPLICAS_OUT_OF_SYNC: {"threshold": 1e-6},
}
DEFAULTS = {code.value: params for code, params in DEFAULTS.items()}


@dataclass
class RuleContext:
    """What a rule may read besides the current snapshot.

    Attributes:
        history: earlier snapshots of this fit, oldest first (bounded; the current one excluded).
        forward_order: module names in the order their forward ran on the first batch (may be
            empty when unknown; rules then fall back to registration order).
        initial_loss: mean training loss of the first steps (NaN until known).
        settings: ``code -> {name: value}``, the defaults merged with the user's settings.
        final: true for the evaluation at the end of fit (the last, possibly partial, window).
    """

    history: Sequence[Snapshot] = ()
    forward_order: Sequence[str] = ()
    initial_loss: float = math.nan
    settings: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULTS.items()})
    final: bool = False

    def setting(self, code: str, name: str) -> Any:
        return self.settings[code][name]

    def recent(self, snapshot: Snapshot, n: int) -> list[Snapshot]:
        """The last ``n`` snapshots including ``snapshot`` (fewer at the start of a fit)."""
        return [*list(self.history)[-(n - 1) :], snapshot] if n > 1 else [snapshot]

    def ordered(self, modules: Iterable[str]) -> list[str]:
        """``modules`` sorted by forward order (unknown ones keep their order, after known ones)."""
        modules = list(modules)
        rank = {name: i for i, name in enumerate(self.forward_order)}
        return sorted(modules, key=lambda name: (rank.get(name, len(rank)), modules.index(name)))

    def alert(
        self,
        code: str,
        snapshot: Snapshot,
        module: str | None,
        value: float,
        threshold: float,
        message: str,
        hint: str,
        severity: str = "warning",
        **extra: Any,
    ) -> Alert:
        """An :class:`Alert` stamped with ``snapshot``'s step and epoch."""
        return Alert(
            code=code,
            severity=severity,
            step=snapshot.step,
            epoch=snapshot.epoch,
            module=module,
            value=float(value),
            threshold=float(threshold),
            message=message,
            hint=hint,
            extra=extra,
        )


def _rule(*codes: AlertCode) -> Callable[[Rule], Rule]:
    def mark(fn: Rule) -> Rule:
        fn.codes = tuple(code.value for code in codes)
        return fn

    return mark


def _held(ctx: RuleContext, snapshot: Snapshot, n: int, condition: Callable[[Snapshot], bool]) -> bool:
    """``condition`` holds on the last ``n`` snapshots (and there are ``n`` of them)."""
    recent = ctx.recent(snapshot, int(n))
    return len(recent) >= n and all(condition(s) for s in recent)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


# ---------------------------------------------------------------------- loss
@_rule(AlertCode.NON_FINITE_LOSS)
def non_finite_loss(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Error when any training loss in the window was NaN or ±Inf."""
    count, bound = snapshot.get("loss_nonfinite", default=0.0), ctx.setting("non_finite_loss", "threshold")
    if count > bound:
        yield ctx.alert(
            "non_finite_loss",
            snapshot,
            None,
            count,
            bound,
            f"The training loss was NaN or infinite at {int(count)} step(s) of the last logging window.",
            "Lower the learning rate, enable gradient clipping (`Trainer(gradient_clip_val=1.0)`), and look "
            "for log/division of zero or an overflow in the loss (use a numerically stable loss such as "
            "`BCEWithLogitsLoss`).",
            severity="error",
        )


@_rule(AlertCode.LOSS_PLATEAU)
def loss_plateau(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """The best window-mean loss is still within ``threshold`` (relative) of the initial loss."""
    s = ctx.settings["loss_plateau"]
    initial = ctx.initial_loss
    if snapshot.step + 1 < s["min_steps"] or not math.isfinite(initial) or initial == 0:
        return
    means = [h.get("loss") for h in ctx.recent(snapshot, len(ctx.history) + 1)]
    means = [m for m in means if math.isfinite(m)]
    if not means:
        return
    improvement = (initial - min(means)) / abs(initial)
    if improvement < s["threshold"]:
        yield ctx.alert(
            "loss_plateau",
            snapshot,
            None,
            improvement,
            s["threshold"],
            f"After {snapshot.step + 1} steps the loss has improved by only {improvement:.1%} from its "
            f"initial {_fmt(initial)} (best window mean {_fmt(min(means))}).",
            "Check that the weights move (`watch/update_ratio`), try a larger learning rate or a learning-rate "
            "finder, check the labels match the inputs, and look for dead or saturated units.",
        )


@_rule(AlertCode.LOSS_DIVERGENCE)
def loss_divergence(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """The window-mean loss rose ``threshold``x above its best level so far (``patience`` of the last 3 windows).

    Only for losses that stay positive: "x times its best level" means nothing for a loss that is
    zero or negative at times (a policy-gradient or GAN generator loss, an ELBO in nats), so the
    rule is silent once the initial loss or any window's minimum was not positive.
    """
    s = ctx.settings["loss_divergence"]
    history = list(ctx.history)
    initial = ctx.initial_loss
    if not math.isfinite(initial) or initial <= 0:
        return
    lows = [w.get("loss_min", default=math.nan) for w in (*history, snapshot)]
    if any(low <= 0 for low in lows if math.isfinite(low)):
        return

    def risen(index: int) -> tuple[bool, float, float]:
        # best level before window `index`: the initial loss or any earlier window mean
        windows = [*history, snapshot]
        earlier = [w.get("loss") for w in windows[:index]]
        best = min([initial, *[m for m in earlier if math.isfinite(m)]])
        mean = windows[index].get("loss")
        ok = math.isfinite(mean) and mean > s["threshold"] * best and mean - best > s["min_rise"] * abs(initial)
        return ok, mean, best

    last = len(history)
    flags = [risen(i)[0] for i in range(max(0, last - 2), last + 1)]
    hit, mean, best = risen(last)
    if hit and sum(flags) >= s["patience"]:
        yield ctx.alert(
            "loss_divergence",
            snapshot,
            None,
            mean / best,
            s["threshold"],
            f"The loss rose to {_fmt(mean)} (window mean), {_fmt(mean / best)} times its best level {_fmt(best)}.",
            "Lower the learning rate (or add warm-up), enable gradient clipping "
            "(`Trainer(gradient_clip_val=1.0)`), and check the data for corrupt batches.",
        )


# ---------------------------------------------------------------------- gradients
@_rule(AlertCode.NON_FINITE_GRADIENTS)
def non_finite_gradients(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Error when gradients contain NaN/Inf; names the first module in forward order."""
    bound = ctx.setting("non_finite_gradients", "threshold")
    bad = [m for m, v in snapshot.modules("grad_nonfinite").items() if v > bound]
    total = snapshot.get("grad_nonfinite", default=0.0)
    if not bad and not total > bound:
        return
    first = ctx.ordered(bad)[0] if bad else None
    count = snapshot.modules("grad_nonfinite").get(first, total) if first else total
    where = f"first in forward order: {first}; " if first else ""
    yield ctx.alert(
        "non_finite_gradients",
        snapshot,
        first,
        count,
        bound,
        f"Gradients contain NaN/Inf values ({where}{len(bad)} module(s) affected).",
        "Lower the learning rate, enable gradient clipping, check the loss for log(0) or division by zero; "
        "under 16-bit precision use `precision='bf16-mixed'` or keep the loss in float32.",
        severity="error",
        modules=ctx.ordered(bad),
    )


@_rule(AlertCode.EXPLODING_GRADIENTS)
def exploding_gradients(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Global gradient norm above an absolute bound or ``growth``x its own reference level."""
    s = ctx.settings["exploding_gradients"]
    norm = snapshot.get("grad_norm")
    if not math.isfinite(norm):
        return
    past = [h.get("grad_norm") for h in ctx.history]
    past = [v for v in past if math.isfinite(v) and v > 0]
    # reference: the larger of the first logged norm and the recent median, so that a run whose
    # gradients shrink as it converges is not flagged when they return to their usual level
    reference = max(past[0], statistics.median(past[-5:])) if past else math.nan
    absolute = norm > s["threshold"]
    grown = math.isfinite(reference) and norm > s["growth"] * reference

    def cond(h: Snapshot) -> bool:
        return h.get("grad_norm") > s["threshold"] or (
            math.isfinite(reference) and h.get("grad_norm") > s["growth"] * reference
        )

    if (absolute or grown) and _held(ctx, snapshot, s["patience"], cond):
        why = f"above the bound {_fmt(s['threshold'])}" if absolute else f"{_fmt(norm / reference)}x its earlier level"
        yield ctx.alert(
            "exploding_gradients",
            snapshot,
            None,
            norm,
            s["threshold"] if absolute else s["growth"] * reference,
            f"The gradient norm reached {_fmt(norm)}, {why}.",
            "Enable gradient clipping (`Trainer(gradient_clip_val=1.0)`), lower the learning rate, and add "
            "normalization or a smaller initialization to deep stacks.",
            severity="error" if norm > 100 * s["threshold"] else "warning",
        )


@_rule(AlertCode.VANISHING_GRADIENTS)
def vanishing_gradients(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """‖g_first‖/‖g_last‖ < threshold and ‖g_first‖ < first_norm (AUTOTRAINER's criterion)."""
    s = ctx.settings["vanishing_gradients"]

    def ends(h: Snapshot) -> tuple[str, float, float] | None:
        norms = {m: v for m, v in h.modules("grad_norm").items() if math.isfinite(v)}
        if len(norms) < 2:
            return None
        order = ctx.ordered(norms)
        first, last = norms[order[0]], norms[order[-1]]
        if last <= 0 or first <= 0:
            return None  # a zero gradient is a dead or stalled layer, not a vanishing one
        return order[0], first, first / last

    def cond(h: Snapshot) -> bool:
        e = ends(h)
        return e is not None and e[2] < s["threshold"] and e[1] < s["first_norm"]

    if _held(ctx, snapshot, s["patience"], cond):
        module, first, ratio = ends(snapshot)
        yield ctx.alert(
            "vanishing_gradients",
            snapshot,
            module,
            ratio,
            s["threshold"],
            f"Gradients reaching the first layer ({module}, norm {_fmt(first)}) are {_fmt(ratio)} times those "
            "at the last layer.",
            "Use ReLU-family activations instead of sigmoid/tanh in hidden layers, add residual connections or "
            "normalization (BatchNorm/LayerNorm), and use a fan-in-aware initialization (Kaiming/Xavier).",
        )


# ---------------------------------------------------------------------- units
@_rule(AlertCode.DEAD_UNITS)
def dead_units(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """A layer's dead fraction at or above ``threshold`` for ``patience`` windows."""
    s = ctx.settings["dead_units"]
    for module, frac in snapshot.modules("dead_frac").items():
        if frac >= s["threshold"] and _held(
            ctx, snapshot, s["patience"], lambda h, m=module: h.modules("dead_frac").get(m, -1.0) >= s["threshold"]
        ):
            yield ctx.alert(
                "dead_units",
                snapshot,
                module,
                frac,
                s["threshold"],
                f"{frac:.0%} of {module}'s units never fired (no positive output / no gradient) over the window.",
                "Use LeakyReLU/GELU instead of ReLU, lower the learning rate, and check the bias initialization "
                "(a very negative bias keeps ReLUs off).",
                severity="error" if frac >= 1.0 else "warning",
            )


@_rule(AlertCode.SATURATED_UNITS)
def saturated_units(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """A bounded activation's saturated share at or above ``threshold`` for ``patience`` windows."""
    s = ctx.settings["saturated_units"]
    for module, frac in snapshot.modules("act_saturated_frac").items():
        if frac >= s["threshold"] and _held(
            ctx,
            snapshot,
            s["patience"],
            lambda h, m=module: h.modules("act_saturated_frac").get(m, -1.0) >= s["threshold"],
        ):
            source = _predecessor(ctx, module) or module
            yield ctx.alert(
                "saturated_units",
                snapshot,
                module,
                frac,
                s["threshold"],
                f"{frac:.0%} of {module}'s outputs sit at the activation's asymptotes "
                "(pre-activations beyond about ±4.6).",
                "Add normalization before the activation, use a smaller initialization or learning rate, or penalize "
                f'that layer\'s pre-activations: `ActivityRegularizer({{"{source}": {{"l2": 1e-3}}}})`.',
            )


@_rule(AlertCode.ACTIVATION_EXPLOSION)
def activation_explosion(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """A parameterized layer's output RMS at or above ``threshold`` (the output layer excluded)."""
    s = ctx.settings["activation_explosion"]
    rms = snapshot.modules("act_rms")
    weighted = set(snapshot.modules("grad_norm")) | set(snapshot.modules("update_ratio"))
    candidates = [m for m in ctx.ordered(rms) if m in weighted] or ctx.ordered(rms)
    # the last layer's outputs are the predictions: their scale is set by the targets
    for module in candidates[:-1]:
        value = rms[module]
        if value >= s["threshold"] and _held(
            ctx, snapshot, s["patience"], lambda h, m=module: h.modules("act_rms").get(m, 0.0) >= s["threshold"]
        ):
            yield ctx.alert(
                "activation_explosion",
                snapshot,
                module,
                value,
                s["threshold"],
                f"{module}'s outputs have RMS {_fmt(value)}.",
                "Normalize the inputs and add normalization layers, use a smaller initialization, or penalize the "
                f'layer\'s outputs: `ActivityRegularizer({{"{module}": {{"l2": 1e-3}}}})`.',
            )


# ---------------------------------------------------------------------- updates
@_rule(AlertCode.STALLED_PARAMETERS)
def stalled_parameters(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Gradients arrive but the weights do not move, for ``patience`` windows."""
    s = ctx.settings["stalled_parameters"]
    n = s["patience"]
    if _held(ctx, snapshot, n, lambda h: h.get("optimizer_steps", default=1.0) == 0):
        yield ctx.alert(
            "stalled_parameters",
            snapshot,
            None,
            0.0,
            s["threshold"],
            "No optimizer step ran in the logged batches: gradients are computed but no weight moves.",
            "Under manual optimization call `opt.step()` (and `opt.zero_grad()`) in `training_step`; check that "
            "`configure_optimizers` returns your optimizer.",
            severity="error",
        )
        return

    def stalled(h: Snapshot, module: str) -> bool:
        # a gradient too small to move float32 weights at all is a vanishing one, not a stall
        grad = h.modules("grad_norm").get(module, 0.0)
        weight = h.modules("param_norm").get(module, 0.0)
        return grad > s["min_grad_ratio"] * weight and h.modules("update_norm").get(module, math.nan) <= s["threshold"]

    for module in snapshot.modules("update_norm"):
        if _held(ctx, snapshot, n, lambda h, m=module: stalled(h, m)):
            yield ctx.alert(
                "stalled_parameters",
                snapshot,
                module,
                snapshot.modules("update_norm")[module],
                s["threshold"],
                f"{module} receives gradients (norm {_fmt(snapshot.modules('grad_norm')[module])}) but its "
                "weights do not move.",
                f"Check that `configure_optimizers` covers {module}'s parameters (e.g. `self.parameters()`), that "
                "its learning rate is not 0, and under manual optimization that every optimizer's `step()` runs.",
            )


@_rule(AlertCode.LARGE_UPDATES, AlertCode.TINY_UPDATES)
def update_size(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Global ‖ΔW‖/‖W‖ per step above / below the healthy range for ``patience`` windows."""
    large, tiny = ctx.settings["large_updates"], ctx.settings["tiny_updates"]
    ratio = snapshot.get("update_ratio")
    if not math.isfinite(ratio):
        return
    if (
        ratio > large["threshold"]
        and _held(ctx, snapshot, large["patience"], lambda h: h.get("update_ratio") > large["threshold"])
        and not _loss_progressing(ctx, snapshot, int(large["patience"]), large["falling"], large["converged"])
    ):
        yield ctx.alert(
            "large_updates",
            snapshot,
            None,
            ratio,
            large["threshold"],
            f"Each step changes the weights by {ratio:.1%} of their norm (healthy: about 0.1%).",
            "Lower the learning rate (or add warm-up); with Adam-like optimizers check `lr` is not 10-100x too high.",
        )
    # a run whose loss fell well below its start has converged: small steps are expected there
    initial = ctx.initial_loss
    converged = math.isfinite(initial) and snapshot.get("loss") < tiny["converged"] * initial
    if (
        0 < ratio < tiny["threshold"]
        and not converged
        and _held(ctx, snapshot, tiny["patience"], lambda h: 0 < h.get("update_ratio") < tiny["threshold"])
    ):
        yield ctx.alert(
            "tiny_updates",
            snapshot,
            None,
            ratio,
            tiny["threshold"],
            f"Each step changes the weights by only {_fmt(ratio)} of their norm (healthy: about 1e-3).",
            "Raise the learning rate (try a learning-rate finder), check the scheduler has not decayed it to "
            "nearly 0, and check the gradients are not vanishing.",
        )


def _loss_progressing(ctx: RuleContext, snapshot: Snapshot, windows: int, falling: float, converged: float) -> bool:
    """Whether the loss makes progress (then large steps are doing no harm).

    It does when it is below ``converged`` x a positive initial loss, or when it fell by more than
    ``falling`` (a share of its magnitude) over the last ``windows`` windows: from the window before
    them, or from the initial loss when there is none yet.
    """
    now, initial = snapshot.get("loss"), ctx.initial_loss
    if not math.isfinite(now):
        return False
    if math.isfinite(initial) and initial > 0 and now < converged * initial:
        return True
    history = list(ctx.history)
    before = history[-windows].get("loss") if len(history) >= windows else initial
    return math.isfinite(before) and now < before - falling * abs(before)


# ---------------------------------------------------------------------- distributed
@_rule(AlertCode.REPLICAS_OUT_OF_SYNC)
def replicas_out_of_sync(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Error when data-parallel replicas hold different weights (checksum spread above ``threshold``)."""
    bound = ctx.setting("replicas_out_of_sync", "threshold")
    bad = {m: v for m, v in snapshot.modules("replica_spread").items() if not v <= bound}
    if not bad:
        return
    first = ctx.ordered(bad)[0]
    yield ctx.alert(
        "replicas_out_of_sync",
        snapshot,
        first,
        bad[first],
        bound,
        f"The data-parallel replicas hold different weights in {len(bad)} module(s) (first: {first}, relative "
        f"checksum spread {_fmt(bad[first])}): each process now trains its own model.",
        "Look for code that changes weights on one rank only after DDP's start-up broadcast: a re-initialisation "
        "or checkpoint load under `if rank == 0`, a hook in `setup`/`on_fit_start`, a rank-dependent seed used "
        "for initialisation after wrapping, or a parameter updated outside the optimizer.",
        severity="error",
        modules=ctx.ordered(bad),
    )


def _predecessor(ctx: RuleContext, module: str) -> str | None:
    order = list(ctx.forward_order)
    if module in order and order.index(module) > 0:
        return order[order.index(module) - 1]
    return None


#: built-in snapshot rules, in evaluation order
BUILTIN_RULES: tuple[Rule, ...] = (
    non_finite_loss,
    non_finite_gradients,
    exploding_gradients,
    vanishing_gradients,
    dead_units,
    saturated_units,
    activation_explosion,
    stalled_parameters,
    update_size,
    loss_plateau,
    loss_divergence,
    replicas_out_of_sync,
)
