"""Frozen parameters at the start of fit: said once, as information, with names and share."""

from __future__ import annotations

from torch import nn

from lightning_watch.alerts.alert import Alert
from lightning_watch.alerts.rules import RuleContext
from lightning_watch.snapshot import Snapshot


def check_frozen(ctx: RuleContext, at: Snapshot, model: nn.Module) -> list[Alert]:
    """``frozen_parameters`` (info) when some parameters do not require a gradient.

    Freezing is often deliberate (fine-tuning, LoRA), so this is information, not a warning: it
    names the frozen modules so that an accidental ``requires_grad_(False)`` is seen at once.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)); model[0].requires_grad_(False)
        Linear(in_features=4, out_features=4, bias=True)
        >>> [(a.code, round(a.value, 2)) for a in check_frozen(RuleContext(), Snapshot(-1, 0), model)]
        [('frozen_parameters', 0.67)]
    """
    frozen: dict[str, int] = {}
    total = 0
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            total += param.numel()
            if not param.requires_grad:
                key = name or type(model).__name__
                frozen[key] = frozen.get(key, 0) + param.numel()
    if not frozen or not total:
        return []
    share = sum(frozen.values()) / total
    names = list(frozen)
    listed = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return [
        ctx.alert(
            "frozen_parameters",
            at,
            None,
            share,
            0.0,
            f"{share:.0%} of the model's parameters are frozen (`requires_grad=False`) and will not train: {listed}.",
            "Nothing to do if this is intended (fine-tuning, adapters); otherwise call `requires_grad_(True)` on "
            "those modules before fit.",
            severity="info",
            modules=names,
        )
    ]
