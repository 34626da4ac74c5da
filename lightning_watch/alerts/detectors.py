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
    # loss standard deviation within a window above this multiple of its mean (a batch of 1-2 samples);
    # `small_threshold` when the logging batch's output has at most `small_batch` rows: per-sample losses
    # of a healthy classifier vary by about their mean (the originals: 0.2 x sqrt(32) = 1.1), so at one
    # or two samples a ratio above 0.5 is that noise, not a trend
    "noisy_training": {"threshold": 1.0, "patience": 3, "small_batch": 2, "small_threshold": 0.5},
    # training and validation inputs on different scales: standard deviations a factor > 1.5 apart, or
    # means more than one standard deviation apart (flips, crops and colour jitter stay well inside)
    "train_val_input_shift": {"threshold": 1.5, "mean_shift": 1.0, "min_batch": 8},
    # the rarest class below a fifth of a balanced share, over at least 20 labels per class
    "label_imbalance": {"threshold": 0.2, "min_per_class": 20},
    # at the end of fit: the loss fell by more than this share over the last two windows (and is
    # still above a tenth of its initial value): info. A warning when the fit ended far from
    # convergence, judged by the end's pace over the fit's average pace (1: a straight fall, > 1:
    # accelerating, 0: levelled off). In a fit of at most `short_windows` windows of 10+ steps (too few
    # for the curve to show convergence): a pace >= `short_pace` with the loss still above `short_level`
    # of its initial value. In a longer fit: a pace >= `warn_pace` (no deceleration at all) with the loss
    # not even halved (`warn_level`). Set so that healthy runs stopped mid-fall stay information: the
    # benchmark originals (pace <= 0.31), the test zoo's 300-step runs (level 0.25-0.37, pace up to 1.08)
    # and healthy Hugging Face models at 150 steps (three windows, level 0.20-0.49, pace 0.58-0.96)
    "still_improving": {
        "threshold": 0.1,
        "warn_pace": 1.0,
        "warn_level": 0.5,
        "short_windows": 2,
        "short_pace": 0.5,
        "short_level": 0.15,
    },
    # a one-column output trained on integer labels 0..C-1 (C >= 3): a regression on class indices
    "regression_on_class_indices": {"threshold": 3, "min_per_class": 10, "loss_scale": 0.5},
    # outputs that are probability rows while the loss never goes below ln(1 + (C-1)/e), the lowest
    # cross-entropy of a probability vector fed to a loss that applies its own log-softmax
    "probability_outputs": {"threshold": 0.99, "patience": 2, "min_steps": 200, "tolerance": 0.02},
    # a dropout layer dropping more than this share (Srivastava et al., JMLR 2014: keep 0.5-0.8 of the
    # hidden units); above the largest rate of published configurations: 0.8, Hugging Face MobileNetV2's
    # classifier dropout (PyTorch's word-language-model example uses up to 0.65)
    "extreme_dropout": {"threshold": 0.85},
    # more than half of a recurrent layer's gate pre-activations saturated (the bound of saturated_units,
    # after DeepDiagnosis, ICSE 2022: saturated when > 50 % of pre-activations are beyond the knee)
    "saturated_gates": {"threshold": 0.5, "patience": 2},
    # a frozen layer runs before trainable ones and, after `min_steps`, the loss is still above this
    # share of its initial value
    "frozen_layers": {"threshold": 0.9, "min_steps": 200},
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


@detector("noisy_training", requires=("loss", "loss_std", "output_rows"))
def noisy_training(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """The loss varies within each window far more than its mean (tiny batches, very high dropout)."""
    s = ctx.settings["noisy_training"]

    def bound(h: Snapshot) -> float:
        tiny = h.get("output_rows", default=math.inf) <= s["small_batch"]
        return s["small_threshold"] if tiny else s["threshold"]

    def noisy(h: Snapshot) -> bool:
        mean, std, low = h.get("loss"), h.get("loss_std"), h.get("loss_min")
        return mean > 0 and low >= 0 and std > bound(h) * mean

    if _held(ctx, snapshot, s["patience"], noisy):
        ratio = snapshot.get("loss_std") / snapshot.get("loss")
        yield ctx.alert(
            "noisy_training",
            snapshot,
            None,
            ratio,
            bound(snapshot),
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
    count = snapshot.get("label_count", default=0.0)
    # the output's last dimension counts the classes only for a C-way cross-entropy classifier, whose loss
    # starts near ln C (chance_level_loss's test); otherwise (a VAE's 64 pixels for 10 digits) the labels do
    tolerance, initial = ctx.setting("chance_level_loss", "start_tolerance"), ctx.initial_loss
    chance = math.log(classes) if classes >= 2 else math.nan
    if not (math.isfinite(initial) and abs(initial - chance) <= tolerance * chance):
        share, classes = snapshot.get("label_rarest_share_seen"), snapshot.get("label_classes_seen")
        count = snapshot.get("label_count_seen", default=0.0)
    if not count >= s["min_per_class"] * classes or not share < s["threshold"]:
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


_SPLIT_SCALES = ("input_mean", "input_std", "val_input_mean", "val_input_std", "output_rows")


@detector("train_val_input_shift", requires=_SPLIT_SCALES)
def train_val_input_shift(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Training and validation inputs are on different scales (preprocessing or noise applied to one split)."""
    s = ctx.settings["train_val_input_shift"]
    mean, std = snapshot.get("input_mean"), snapshot.get("input_std")
    val_mean, val_std = snapshot.get("val_input_mean"), snapshot.get("val_input_std")
    if not all(math.isfinite(v) for v in (mean, std, val_mean, val_std)) or min(std, val_std) <= 0:
        return
    if snapshot.get("output_rows", default=math.inf) < s["min_batch"]:
        return  # the spread of one or two training samples says little about the training set's
    ratio = max(std / val_std, val_std / std)
    shift = abs(mean - val_mean) / max(std, val_std)
    if not (ratio > s["threshold"] or shift > s["mean_shift"]):
        return
    yield ctx.alert(
        "train_val_input_shift",
        snapshot,
        None,
        ratio,
        s["threshold"],
        f"The training inputs (mean {mean:.3g}, std {std:.3g}) and the validation inputs (mean {val_mean:.3g}, std "
        f"{val_std:.3g}) are on different scales: the model learns on one distribution and is judged on another.",
        "Apply the same preprocessing (normalization, scaling, tokenization) to both splits, computed from the "
        "training set; if noise or augmentation is added to the training inputs on purpose, lower its strength.",
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
#: initial loss: the mean of the first 10 steps (LossWindow's INITIAL_STEPS), centred on step 4.5
_INITIAL_MID = 4.5


def _windows(snapshot: Snapshot, ctx: RuleContext) -> list[tuple[float, float, float, float, Snapshot]]:
    """``(first step, last step, mean loss, standard error, snapshot)`` of each window with a loss, oldest first."""
    out, previous = [], -1
    for h in [*ctx.history, snapshot]:
        loss, std = h.get("loss"), h.get("loss_std", default=0.0)
        if math.isfinite(loss) and h.step > previous:
            n = h.step - previous
            out.append((previous + 1.0, float(h.step), loss, std / math.sqrt(n) if math.isfinite(std) else 0.0, h))
        previous = max(previous, h.step)
    return out


def end_pace(snapshot: Snapshot, ctx: RuleContext) -> tuple[float, float, float] | None:
    """``(slope at the end, average slope, loss at the end)`` of the fit's loss curve, per step; ``None`` if unknown.

    The end's slope comes from the last three windows' means (least squares at their centres), from
    two windows' means, or, in a fit of one window, from that window's sampled losses
    (:class:`~lightning_watch.alerts.probes.LossTrend`). The average slope runs from the initial
    loss to the end. A last window of fewer than 10 steps (a partial window flushed at the end of
    fit) is left out when there is another: its mean is too noisy to say where the curve goes.
    A fall within noise (3 standard errors of the window means; within one window, its step-to-step
    spread) is no fall: ``None``.

    Example:
        >>> from lightning_watch.alerts.rules import RuleContext
        >>> history = [Snapshot(step=s, epoch=0) for s in (49, 99)]
        >>> for h, v in zip(history, (2.0, 1.5)): h.put("loss", v)
        >>> end = Snapshot(step=149, epoch=0); end.put("loss", 1.0)
        >>> pace = end_pace(end, RuleContext(history=history, initial_loss=2.25))
        >>> [round(v, 4) for v in pace]
        [-0.01, -0.0104, 1.0]
    """
    windows = _windows(snapshot, ctx)
    initial = ctx.initial_loss
    if not windows or not math.isfinite(initial):
        return None
    if len(windows) >= 2 and windows[-1][1] - windows[-1][0] + 1 < 10:
        windows = windows[:-1]
    mids = [(w[0] + w[1]) / 2 for w in windows]
    if len(windows) >= 2:
        last = windows[-3:]
        x, y = mids[-len(last) :], [w[2] for w in last]
        xm, ym = sum(x) / len(x), sum(y) / len(y)
        slope = sum((a - xm) * (b - ym) for a, b in zip(x, y)) / sum((a - xm) ** 2 for a in x)
        fall, noise = last[0][2] - last[-1][2], math.hypot(last[0][3], last[-1][3])
        end_loss, end_step = y[-1], x[-1]
    else:
        first, last_step, mean, _, only = windows[0]
        slope = only.get("loss_slope")
        if not math.isfinite(slope):
            return None
        end_step = last_step
        # a straight line through a convex curve overshoots its end: never below the lowest loss seen
        end_loss = max(mean + slope * (last_step - mids[0]), only.get("loss_min", default=-math.inf))
        # few points: the fall over the window must exceed the window's whole step-to-step spread
        # (trend included), i.e. 3 x a third of it
        fall, noise = -slope * (last_step - first), only.get("loss_std", default=0.0) / 3
    if not fall > 3 * noise or end_step <= _INITIAL_MID:
        return None
    return slope, (end_loss - initial) / (end_step - _INITIAL_MID), end_loss


@detector("still_improving", requires=("loss", "loss_slope"))
def still_improving(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """At the end of fit, the loss was still falling steeply (a warning when it had not begun to level off)."""
    if not ctx.final:
        return
    s = ctx.settings["still_improving"]
    pace = end_pace(snapshot, ctx)
    if pace is not None:
        slope, average, end_loss = pace
        level = end_loss / ctx.initial_loss if ctx.initial_loss > 0 else math.nan
        ratio = slope / average if average < 0 else math.nan
        full = [w for w in _windows(snapshot, ctx) if w[1] - w[0] + 1 >= 10]  # a flushed tail is no window
        short = len(full) <= s["short_windows"]
        pace_bound = s["short_pace"] if short else s["warn_pace"]
        level_bound = s["short_level"] if short else s["warn_level"]
        if slope < 0 and ratio >= pace_bound and level >= level_bound:
            yield ctx.alert(
                "still_improving",
                snapshot,
                None,
                ratio,
                pace_bound,
                f"Training ended far from convergence: the loss ({end_loss:.3g}, {level:.0%} of where it started) "
                f"was still falling at {ratio:.0%} of its average pace over the fit, with no sign of levelling off.",
                "Train longer (more epochs or steps; with a small training set, more data); if the budget is fixed, "
                "raise the learning rate. A loss that falls slowly from the start can also mean slow-learning "
                "activations (sigmoid/tanh hidden layers), very noisy inputs or labels, or too much dropout.",
            )
            return
    bound = s["threshold"]
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


# ---------------------------------------------------------------------- loss and labels
@detector("regression_on_class_indices", requires=("output_width", "label_classes", "label_mean_square"))
def regression_on_class_indices(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """A one-column output trained on integer labels that cover 0..C-1 (C >= ``threshold``): class indices regressed."""
    s = ctx.settings["regression_on_class_indices"]
    width, classes = snapshot.get("output_width"), snapshot.get("label_classes")
    count, rarest = snapshot.get("label_count", default=0.0), snapshot.get("label_rarest_share", default=0.0)
    # every index 0..C-1 seen (rarest > 0), with enough labels to say so
    if not (width == 1 and classes >= s["threshold"] and count >= s["min_per_class"] * classes and rarest > 0):
        return
    # and a loss on the scale of the labels themselves (an MSE from a near-zero output starts near their
    # mean square; the benchmark's start at 0.7-0.9 of it): a GAN's discriminator, one column next to digit
    # labels it never sees, starts at a binary cross-entropy of about 0.7, a fortieth of 0..9's mean square
    if not ctx.initial_loss >= s["loss_scale"] * snapshot.get("label_mean_square"):
        return
    yield ctx.alert(
        "regression_on_class_indices",
        snapshot,
        None,
        classes,
        s["threshold"],
        f"The model has one output per sample, trained on integer labels 0..{int(classes) - 1}: class indices "
        "treated as quantities (e.g. `MSELoss` on the label), so the model is taught that class 7 lies between 6 "
        "and 8 and is penalised for predicting 6.5.",
        f"For classification, give the last layer {int(classes)} outputs and use `CrossEntropyLoss` on the integer "
        "labels. If the integers really are quantities (counts, ratings), switch this check off: "
        "`settings={'regression_on_class_indices': False}`.",
    )


@detector("probability_outputs", requires=("output_prob_rows", "output_classes", "loss"))
def probability_outputs(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """The outputs are probability rows and the loss never fell below the cross-entropy floor of probabilities."""
    s = ctx.settings["probability_outputs"]
    classes = snapshot.get("output_classes")
    if snapshot.step + 1 < s["min_steps"] or not classes >= 2:
        return
    if not _held(ctx, snapshot, s["patience"], lambda h: h.get("output_prob_rows", default=0.0) >= s["threshold"]):
        return
    # log-softmax of a vector in the simplex: at best one entry 1 and the rest 0, a loss of ln(1 + (C-1)/e)
    floor = math.log(1 + (classes - 1) / math.e)
    best = min((v for v in (h.get("loss") for h in [*ctx.history, snapshot]) if math.isfinite(v)), default=math.nan)
    if not best >= (1 - s["tolerance"]) * floor:
        return
    yield ctx.alert(
        "probability_outputs",
        snapshot,
        None,
        best,
        floor,
        f"The model's outputs are probability vectors (rows in [0, 1] summing to 1) and the loss ({best:.3g} at "
        f"best) never went below {floor:.3g} = ln(1 + (C-1)/e), the lowest `CrossEntropyLoss` can give when fed "
        "probabilities: a softmax before a loss that applies its own, which also flattens the gradients.",
        "Return raw logits from `forward` and let `CrossEntropyLoss` apply the log-softmax; apply `softmax` only "
        "when you need probabilities (metrics, inference). With `NLLLoss`, feed it `log_softmax` outputs.",
    )


# ---------------------------------------------------------------------- the model's structure
@detector("extreme_dropout", requires=("dropout_p",))
def extreme_dropout(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """A dropout layer drops more than ``threshold`` of its inputs."""
    bound = ctx.setting("extreme_dropout", "threshold")
    high = {m: p for m, p in snapshot.modules("dropout_p").items() if p > bound}
    if not high:
        return
    modules = ctx.ordered(high)
    p = max(high.values())
    listed = ", ".join(modules[:5]) + (", ..." if len(modules) > 5 else "")
    yield ctx.alert(
        "extreme_dropout",
        snapshot,
        None,
        p,
        bound,
        f"Dropout drops {p:.0%} of the activations in {listed}: each step trains a tiny random sub-network on a "
        "signal that is mostly zeros, so the loss falls slowly and noisily.",
        "Use a drop probability of 0.1-0.5 (`nn.Dropout(p)` takes the share to drop, not to keep); if you meant "
        "to keep 90 %, write `nn.Dropout(0.1)`.",
        modules=modules,
    )


@detector("saturated_gates", requires=("gate_saturated_frac",))
def saturated_gates(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """Most gate pre-activations of a recurrent layer are saturated, for ``patience`` windows."""
    s = ctx.settings["saturated_gates"]
    for module, share in snapshot.modules("gate_saturated_frac").items():
        if not share > s["threshold"]:
            continue
        held = _held(ctx, snapshot, s["patience"], lambda h, m=module: h.get("gate_saturated_frac", m) > s["threshold"])
        if not held:
            continue
        yield ctx.alert(
            "saturated_gates",
            snapshot,
            module,
            share,
            s["threshold"],
            f"{share:.0%} of the gate pre-activations inside {module} are saturated (sigmoid gates stuck near 0 or 1, "
            "the tanh candidate near -1 or 1): their gradients vanish and the layer stops learning.",
            "Standardize the inputs, keep PyTorch's default recurrent initialisation (uniform in +-1/sqrt(hidden)), "
            "lower the learning rate, and clip gradients (`Trainer(gradient_clip_val=1.0)`).",
        )


@detector("frozen_layers", requires=("frozen", "loss"))
def frozen_layers(snapshot: Snapshot, ctx: RuleContext) -> Iterable[Alert]:
    """A frozen layer runs before trainable ones, and after ``min_steps`` the loss has hardly fallen."""
    s = ctx.settings["frozen_layers"]
    flags = snapshot.modules("frozen")
    initial = ctx.initial_loss
    if not flags or snapshot.step + 1 < s["min_steps"] or not (math.isfinite(initial) and initial > 0):
        return
    order = ctx.ordered(flags)  # forward order of the first batch; modules it did not see keep theirs, after
    seen = set(ctx.forward_order)
    ran = [m for m in order if not seen or m in seen]  # a module forward never ran is not "in the path"
    trainable = [i for i, m in enumerate(ran) if flags[m] == 0.0]
    frozen = [m for i, m in enumerate(ran) if flags[m] == 1.0 and trainable and i < trainable[-1]]
    if not frozen:
        return
    best = min((v for v in (h.get("loss") for h in [*ctx.history, snapshot]) if math.isfinite(v)), default=math.nan)
    if not best >= s["threshold"] * initial:
        return
    listed = ", ".join(frozen[:5]) + (", ..." if len(frozen) > 5 else "")
    yield ctx.alert(
        "frozen_layers",
        snapshot,
        None,
        best / initial,
        s["threshold"],
        f"After {snapshot.step + 1} steps the loss ({best:.3g} at best) is still {best / initial:.0%} of its initial "
        f"value, and frozen layers run before the trainable ones: {listed}. The layers after them can only "
        "learn from what the frozen ones pass on.",
        "If these layers were not meant to be frozen, call `requires_grad_(True)` on them (and make sure the "
        "optimizer holds their parameters); if they are a pretrained backbone, check it was loaded, and that "
        "the inputs are preprocessed as it expects.",
        modules=frozen,
    )


#: the detectors here, in evaluation order
DETECTORS: tuple[Rule, ...] = (
    gradients_not_zeroed,
    disconnected_parameters,
    unnormalized_inputs,
    label_imbalance,
    noisy_training,
    train_val_input_shift,
    chance_level_loss,
    rectified_outputs,
    symmetric_units,
    still_improving,
    regression_on_class_indices,
    probability_outputs,
    extreme_dropout,
    saturated_gates,
    frozen_layers,
)
