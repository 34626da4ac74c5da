"""Detectors of faults from the taxonomy of real deep-learning bugs, as snapshot rules.

Each detector is a rule (``rule(snapshot, context) -> alerts``) that declares the codes it can
raise (``codes``) and the statistics it reads (``requires``: metric names; the hub's probes of
:mod:`lightning_watch.alerts.probes` and the monitors produce them). A detector whose inputs were
not measured stays silent, and the report says it did not check.

Thresholds and their sources are in :data:`DEFAULTS` and the README's alert table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from lightning_watch.alerts.alert import Alert
from lightning_watch.alerts.rules import Rule, RuleContext
from lightning_watch.snapshot import Snapshot

#: settings of the detectors here (merged into the engine's defaults)
DEFAULTS: dict[str, dict[str, float]] = {
    # an exact invariant (TrainCheck, OSDI 2025: "gradients are zeroed before backward"): any stale step
    "gradients_not_zeroed": {"threshold": 0.0},
    # any trainable parameter of an optimizer without a gradient, in two logging windows running
    "disconnected_parameters": {"threshold": 0.0, "patience": 2},
    # inputs far from unit scale (LeCun et al., "Efficient BackProp", 1998: standardize inputs)
    "unnormalized_inputs": {"threshold": 10.0},
    # a cross-entropy-like loss that starts at ln C and stays within 10 % of it
    "chance_level_loss": {"threshold": 0.9, "min_steps": 200, "start_tolerance": 0.25},
    # more than half of the model's outputs exactly zero (a rectifier on the logits)
    "rectified_outputs": {"threshold": 0.5, "patience": 2},
    # units of a layer identical to each other (constant initialisation): relative spread below this
    "symmetric_units": {"threshold": 1e-6, "patience": 2},
    # loss standard deviation within a window above this multiple of its mean (a batch of 1-2 samples)
    "noisy_training": {"threshold": 1.0, "patience": 3},
    # the rarest class below a fifth of a balanced share, over at least 20 labels per class
    "label_imbalance": {"threshold": 0.2, "min_per_class": 20},
    # at the end of fit: the loss fell by more than this share over the last two windows (and is
    # still above a tenth of its initial value)
    "still_improving": {"threshold": 0.1},
}


def detector(*codes: str, requires: Iterable[str] = ()) -> Callable[[Rule], Rule]:
    """Mark a rule with the codes it raises and the metrics it reads."""

    def mark(fn: Rule) -> Rule:
        fn.codes = tuple(codes)
        fn.requires = tuple(requires)
        return fn

    return mark


def _held(ctx: RuleContext, snapshot: Snapshot, n: float, condition: Callable[[Snapshot], bool]) -> bool:
    recent = ctx.recent(snapshot, int(n))
    return len(recent) >= n and all(condition(s) for s in recent)


# ---------------------------------------------------------------------- gradients
@detector("gradients_not_zeroed", requires=("grads_not_zeroed",))
def gradients_not_zeroed(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """An optimizer step was followed by a backward into non-zero gradients."""
    value = snapshot.get("grads_not_zeroed", default=0.0)
    bound = ctx.setting("gradients_not_zeroed", "threshold")
    if value > bound:
        yield ctx.alert(
            "gradients_not_zeroed",
            snapshot,
            None,
            value,
            bound,
            "After an optimizer step, the next backward started from non-zero gradients: gradients pile up "
            "across steps instead of being computed afresh.",
            "Call `optimizer.zero_grad()` after each `optimizer.step()` in `training_step` (manual optimization); "
            "if you accumulate on purpose, zero after the step that ends the accumulation.",
            severity="error",
        )


@detector("disconnected_parameters", requires=("params_without_grad",))
def disconnected_parameters(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Trainable parameters of an optimizer got no gradient in ``patience`` logging windows running."""
    s = ctx.settings["disconnected_parameters"]
    share = snapshot.get("params_without_grad", default=0.0)
    if not _held(ctx, snapshot, s["patience"], lambda h: h.get("params_without_grad", default=0.0) > s["threshold"]):
        return
    modules = ctx.ordered(snapshot.modules("grad_missing"))
    where = f" ({', '.join(modules[:5])}{', ...' if len(modules) > 5 else ''})" if modules else ""
    yield ctx.alert(
        "disconnected_parameters",
        snapshot,
        None,
        share,
        s["threshold"],
        f"{share:.1%} of the parameters the optimizers train receive no gradient{where}: they are cut off from "
        "the loss and never learn.",
        "Look for a `.detach()`, `torch.no_grad()`, `.data` or a non-differentiable op (argmax, rounding, integer "
        "casts) between these layers and the loss, or a layer that `forward` never uses; freeze it "
        "(`requires_grad_(False)`) if that is intended.",
    )


# ---------------------------------------------------------------------- data
@detector("unnormalized_inputs", requires=("input_mean", "input_std"))
def unnormalized_inputs(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """The floating-point inputs are far from unit scale (mean or standard deviation above ``threshold``)."""
    bound = ctx.setting("unnormalized_inputs", "threshold")
    mean, std = snapshot.get("input_mean"), snapshot.get("input_std")
    scale = max(abs(mean), std) if math.isfinite(mean) and math.isfinite(std) else math.nan
    if scale > bound:
        yield ctx.alert(
            "unnormalized_inputs",
            snapshot,
            None,
            scale,
            bound,
            f"The training inputs have mean {mean:.3g} and standard deviation {std:.3g}: far from the unit scale "
            "that initialisations and learning rates assume (raw pixel values 0-255, raw measurements).",
            "Standardize the inputs (subtract the training set's mean, divide by its std; for images e.g. "
            "`x / 255` then `transforms.Normalize`), or add a normalization layer in front of the model.",
        )


@detector("noisy_training", requires=("loss", "loss_std"))
def noisy_training(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """The loss varies within each window far more than its mean (tiny batches, very high dropout)."""
    s = ctx.settings["noisy_training"]

    def noisy(h: Snapshot) -> bool:
        mean, std, low = h.get("loss"), h.get("loss_std"), h.get("loss_min")
        return mean > 0 and low >= 0 and std > s["threshold"] * mean

    if _held(ctx, snapshot, s["patience"], noisy):
        ratio = snapshot.get("loss_std") / snapshot.get("loss")
        yield ctx.alert(
            "noisy_training",
            snapshot,
            None,
            ratio,
            s["threshold"],
            f"The training loss varies from step to step by {ratio:.2g}x its mean, window after window: each "
            "step's gradient is mostly noise.",
            "Use a larger batch (or accumulate gradients: `Trainer(accumulate_grad_batches=8)`), lower the learning "
            "rate, and check the dropout rate is not extreme.",
        )


@detector("label_imbalance", requires=("label_rarest_share", "label_classes", "label_count"))
def label_imbalance(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Some class is far rarer among the training labels than a balanced share (sampled batches)."""
    s = ctx.settings["label_imbalance"]
    share, classes = snapshot.get("label_rarest_share"), snapshot.get("label_classes")
    if not snapshot.get("label_count", default=0.0) >= s["min_per_class"] * classes or not share < s["threshold"]:
        return
    yield ctx.alert(
        "label_imbalance",
        snapshot,
        None,
        share,
        s["threshold"],
        f"The rarest of the {int(classes)} classes makes up {share / classes:.1%} of the training labels seen, "
        f"{share:.2f}x its share if the classes were balanced: the model can ignore it and still score well.",
        "If this is not the real class balance, check how the training set was built (filtering, sampling); "
        "otherwise weight the loss (`CrossEntropyLoss(weight=...)`) or resample (`WeightedRandomSampler`).",
    )


# ---------------------------------------------------------------------- outputs and loss
@detector("chance_level_loss", requires=("loss", "output_classes"))
def chance_level_loss(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """A classification loss that started at ln C (C classes) is still near it after ``min_steps``."""
    s = ctx.settings["chance_level_loss"]
    classes, loss, initial = snapshot.get("output_classes"), snapshot.get("loss"), ctx.initial_loss
    if snapshot.step + 1 < s["min_steps"] or not classes >= 2 or not math.isfinite(initial):
        return
    chance = math.log(classes)
    if abs(initial - chance) > s["start_tolerance"] * chance:
        return  # not a cross-entropy over these outputs
    best = min([loss, *(h.get("loss") for h in ctx.history)], key=lambda v: v if math.isfinite(v) else math.inf)
    if not best >= s["threshold"] * chance:
        return
    cause = ""
    if snapshot.get("output_prob_rows", default=0.0) > 0.99:
        cause = " The outputs are probability vectors: a softmax before `CrossEntropyLoss`, which applies its own."
    elif snapshot.get("output_zero_frac", default=0.0) > 0.3:
        cause = " Many outputs are exactly zero: a ReLU on the logits."
    yield ctx.alert(
        "chance_level_loss",
        snapshot,
        None,
        best / chance,
        s["threshold"],
        f"After {snapshot.step + 1} steps the loss ({best:.3g} at best) is still near ln({int(classes)}) = "
        f"{chance:.3g}, the loss of guessing uniformly among {int(classes)} classes.{cause}",
        "Return raw logits from the model (no softmax/ReLU on the last layer), check the labels match the inputs "
        "(and are not shuffled separately), and check the learning rate and that the weights move.",
    )


@detector("rectified_outputs", requires=("output_zero_frac",))
def rectified_outputs(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """More than ``threshold`` of the model's outputs are exactly zero (a rectifier on the logits)."""
    s = ctx.settings["rectified_outputs"]
    if not _held(ctx, snapshot, s["patience"], lambda h: h.get("output_zero_frac", default=0.0) > s["threshold"]):
        return
    share = snapshot.get("output_zero_frac")
    yield ctx.alert(
        "rectified_outputs",
        snapshot,
        None,
        share,
        s["threshold"],
        f"{share:.0%} of the model's outputs are exactly zero: a ReLU (or clamp) on the last layer cuts off every "
        "negative logit and its gradient.",
        "Remove the activation after the last layer: losses such as `CrossEntropyLoss` and `BCEWithLogitsLoss` "
        "expect raw logits.",
    )


# ---------------------------------------------------------------------- weights
@detector("symmetric_units", requires=("unit_spread",))
def symmetric_units(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Every unit of a layer has the same weights (constant initialisation), for ``patience`` windows."""
    s = ctx.settings["symmetric_units"]
    for module, spread in snapshot.modules("unit_spread").items():
        if not spread <= s["threshold"]:
            continue
        if not _held(ctx, snapshot, s["patience"], lambda h, m=module: h.get("unit_spread", m) <= s["threshold"]):
            continue
        yield ctx.alert(
            "symmetric_units",
            snapshot,
            module,
            spread,
            s["threshold"],
            f"All units of {module} have identical weights: they compute the same function, receive the same "
            "gradient and stay identical, so the layer acts as one unit.",
            "Initialise weights randomly (PyTorch's default `reset_parameters()`, or `nn.init.kaiming_uniform_`/"
            "`xavier_uniform_`); never `nn.init.constant_` or `zeros_` on a weight matrix.",
        )


# ---------------------------------------------------------------------- the end of fit
@detector("still_improving", requires=("loss",))
def still_improving(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """At the end of fit, the loss was still falling steeply over the last windows."""
    if not ctx.final:
        return
    bound = ctx.setting("still_improving", "threshold")
    losses = [h.get("loss") for h in ctx.recent(snapshot, 3)]
    if len(losses) < 3 or not all(math.isfinite(v) and v > 0 for v in losses):
        return
    drop = (losses[0] - losses[-1]) / losses[0]
    # a loss already far below where it started (a separable problem's cross-entropy keeps halving) is done
    high = not math.isfinite(ctx.initial_loss) or losses[-1] > 0.1 * ctx.initial_loss
    if losses[0] > losses[1] > losses[2] and drop > bound and high:
        yield ctx.alert(
            "still_improving",
            snapshot,
            None,
            drop,
            bound,
            f"Training ended while the loss was still falling steeply: {drop:.0%} lower over the last two logging "
            f"windows ({losses[0]:.3g} -> {losses[-1]:.3g}).",
            "Train longer (`max_epochs`/`max_steps`), or raise the learning rate if the budget is fixed.",
            severity="info",
        )


still_improving.at_end = True  # judged on the final window, also when its step was judged already

#: the detectors here, in evaluation order
DETECTORS: tuple[Rule, ...] = (
    gradients_not_zeroed,
    disconnected_parameters,
    unnormalized_inputs,
    label_imbalance,
    noisy_training,
    chance_level_loss,
    rectified_outputs,
    symmetric_units,
    still_improving,
)
