"""The mutation operators: DeepCrime's groups (Humbatova et al., ISSTA 2021) and PyTorch-specific slips.

Each operator edits the setup's config (see :data:`.setups.BASE`), declares the fault family it belongs
to, and the alert codes that name its cause ("cause hits"). Codes in :data:`PLANNED` are those issue 13
asks for and ``Watch`` does not raise yet: they count as soon as a detector of that name exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FAMILIES = ("data", "optimization", "activations", "weights", "loss", "gradients")

#: codes of detectors issue 13 asks for, not raised by today's Watch (names to align with their authors)
PLANNED = (
    "gradients_not_zeroed",
    "disconnected_parameters",
    "no_loss",
    "frozen_layers",
    "symmetric_units",
    "unnormalized_inputs",
    "loss_at_chance",
    "framework_warning",
    "still_improving",
    "noisy_training",
    "label_imbalance",
)

ALL = ("mlp", "cnn", "lstm", "transformer")
SEQ = ("lstm", "transformer")


@dataclass(frozen=True)
class Operator:
    """One fault: ``edit`` turns an original config into the mutant's."""

    name: str
    group: str  # DeepCrime group or "pytorch"
    family: str
    causes: tuple[str, ...]
    edit: Callable[[dict[str, Any]], dict[str, Any]]
    description: str
    setups: tuple[str, ...] = ALL

    def apply(self, cfg: dict[str, Any]) -> dict[str, Any]:
        out = dict(cfg)
        out.update(self.edit(cfg))
        return out


def _op(name, group, family, causes, description, setups=ALL, **changes):
    def edit(cfg: dict[str, Any], changes=changes) -> dict[str, Any]:
        return {k: (v(cfg) if callable(v) else v) for k, v in changes.items()}

    return Operator(name, group, family, tuple(causes), edit, description, tuple(setups))


_PLATEAU = ("loss_plateau", "loss_at_chance")
_HIGH_LR = (
    "large_updates",
    "loss_divergence",
    "exploding_gradients",
    "non_finite_loss",
    "non_finite_gradients",
    "activation_explosion",
)

OPERATORS: tuple[Operator, ...] = (
    # ---- training data
    _op(
        "TCL",
        "training data",
        "data",
        (*_PLATEAU, "noisy_training"),
        "50 % of training labels changed",
        label_noise=0.5,
    ),
    _op(
        "TRD",
        "training data",
        "data",
        ("still_improving", "loss_plateau"),
        "80 % of training data removed",
        remove_data=0.8,
    ),
    _op(
        "TUD",
        "training data",
        "data",
        ("label_imbalance",),
        "upper half of the classes: 95 % of samples removed",
        unbalance=0.95,
    ),
    _op(
        "TAN",
        "training data",
        "data",
        (*_PLATEAU, "noisy_training"),
        "Gaussian noise (std 2) on training inputs",
        input_noise=2.0,
    ),
    # ---- hyperparameters
    _op(
        "HBS",
        "hyperparameters",
        "optimization",
        ("noisy_training", "small_batch_norm", *_HIGH_LR),
        "batch size 1 (1500 steps)",
        batch_size=1,
        epochs=1,
        max_steps=1500,
    ),
    _op("HLR_x100", "hyperparameters", "optimization", _HIGH_LR, "learning rate x100", lr=lambda c: c["lr"] * 100),
    _op(
        "HLR_div1000",
        "hyperparameters",
        "optimization",
        ("tiny_updates", "stalled_parameters", "loss_plateau", "still_improving"),
        "learning rate / 1000",
        lr=lambda c: c["lr"] / 1000,
    ),
    _op("HNE", "hyperparameters", "optimization", ("still_improving",), "one epoch instead of 5-8", epochs=1),
    _op("HDB", "hyperparameters", "activations", ("noisy_training", *_PLATEAU), "dropout 0.9", dropout=0.9),
    # ---- activation
    _op(
        "ACH",
        "activation",
        "activations",
        ("saturated_units", "vanishing_gradients", *_PLATEAU),
        "hidden activations changed to sigmoid",
        act="sigmoid",
    ),
    _op("ARM", "activation", "activations", _PLATEAU, "hidden activations removed", act="linear"),
    _op(
        "AAL",
        "activation",
        "activations",
        ("saturated_units", *_PLATEAU),
        "sigmoid added on the logits",
        logits_act="sigmoid",
    ),
    # ---- regularisation
    _op(
        "RAW",
        "regularisation",
        "weights",
        ("tiny_updates", "vanishing_gradients", "dead_units", *_PLATEAU),
        "L2 penalty 0.01 added on every layer",
        reg=lambda c: {**c["reg"], "all": ("l2", 1e-2)},
    ),
    _op(
        "RCW",
        "regularisation",
        "weights",
        ("tiny_updates", "vanishing_gradients", "dead_units", *_PLATEAU),
        "first layer's L2 1e-4 changed to L1 0.01",
        reg={"first": ("l1", 1e-2)},
    ),
    _op("RRW", "regularisation", "weights", ("loss_plateau",), "weight penalty removed", reg={}),
    # ---- weights
    _op(
        "WCI",
        "weights",
        "weights",
        ("symmetric_units", "dead_units", "vanishing_gradients", *_PLATEAU),
        "constant weight initialisation (0.05)",
        init="constant",
    ),
    _op(
        "WAB",
        "weights",
        "weights",
        (),
        "bias added to the convolutions before BatchNorm",
        setups=("cnn",),
        conv_bias=True,
    ),
    _op("WRB", "weights", "weights", ("dead_units", *_PLATEAU), "every bias removed", bias=False),
    # ---- loss and optimisation
    _op("LCH", "loss", "loss", (*_PLATEAU, "framework_warning"), "MSE on class indices (one output)", loss="mse_idx"),
    _op(
        "OCH",
        "optimisation",
        "optimization",
        ("tiny_updates", "stalled_parameters", "loss_plateau", "still_improving"),
        "Adam changed to plain SGD (same lr)",
        optimizer="sgd",
    ),
    _op(
        "OCG",
        "optimisation",
        "optimization",
        ("tiny_updates", "stalled_parameters", "still_improving"),
        "gradient clipping at norm 1e-4",
        grad_clip=1e-4,
    ),
    _op("VRM", "validation", "data", (), "validation removed (accuracy still measured after fit)", validate=False),
    # ---- PyTorch / Lightning specific
    _op(
        "no_zero_grad",
        "pytorch",
        "gradients",
        ("gradients_not_zeroed", *_HIGH_LR),
        "manual optimization without optimizer.zero_grad()",
        manual=True,
        zero_grad=False,
    ),
    _op(
        "none_return",
        "pytorch",
        "loss",
        ("no_loss",),
        "manual optimization, training_step returns None",
        manual=True,
        return_none=True,
    ),
    _op(
        "none_return_lr_x100",
        "pytorch",
        "loss",
        ("no_loss", *_HIGH_LR),
        "manual optimization, training_step returns None, learning rate x100",
        manual=True,
        return_none=True,
        lr=lambda c: c["lr"] * 100,
    ),
    _op(
        "detach",
        "pytorch",
        "gradients",
        ("disconnected_parameters", "stalled_parameters", "vanishing_gradients"),
        ".detach() after the first block in forward",
        detach=True,
    ),
    _op(
        "frozen",
        "pytorch",
        "gradients",
        ("frozen_layers", "stalled_parameters"),
        "first layer frozen",
        freeze_first=True,
    ),
    _op(
        "head_only_optimizer",
        "pytorch",
        "optimization",
        ("stalled_parameters", "disconnected_parameters"),
        "optimizer built over the last layer's parameters only",
        optimize_head_only=True,
    ),
    _op(
        "mse_broadcast",
        "pytorch",
        "loss",
        ("framework_warning", *_PLATEAU),
        "MSE of (N, 1) outputs against (N,) class indices: broadcasts to (N, N)",
        loss="mse_broadcast",
    ),
    _op(
        "view_not_permute",
        "pytorch",
        "data",
        ("batch_mixing", *_PLATEAU),
        "x.view(T, N, F) instead of x.permute(1, 0, 2)",
        setups=SEQ,
        view_not_permute=True,
    ),
    _op(
        "softmax_batch",
        "pytorch",
        "loss",
        ("batch_mixing", *_PLATEAU),
        "log-softmax over the batch dimension",
        softmax_batch=True,
    ),
    _op(
        "unnormalized",
        "pytorch",
        "data",
        ("unnormalized_inputs", "saturated_units", "activation_explosion", "exploding_gradients", "large_updates"),
        "inputs x255 (unnormalized)",
        input_scale=255.0,
    ),
    _op(
        "relu_logits",
        "pytorch",
        "activations",
        ("dead_units", "saturated_units", *_PLATEAU),
        "ReLU on the logits before CrossEntropyLoss",
        logits_act="relu",
    ),
    _op(
        "softmax_logits",
        "pytorch",
        "activations",
        ("saturated_units", "vanishing_gradients", *_PLATEAU),
        "softmax on the logits before CrossEntropyLoss",
        logits_act="softmax",
    ),
)

BY_NAME = {op.name: op for op in OPERATORS}
ORIGINAL = "original"


def select(names: str | None) -> list[Operator]:
    """Operators named in a comma-separated list (all when ``names`` is empty)."""
    if not names:
        return list(OPERATORS)
    out = []
    for name in names.split(","):
        if name not in BY_NAME:
            raise ValueError(f"`--operators` must name operators of {sorted(BY_NAME)}, got {name!r}.")
        out.append(BY_NAME[name])
    return out
