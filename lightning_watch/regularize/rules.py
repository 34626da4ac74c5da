"""Activity-penalty rules: what a rule selects, how its penalty is computed, and input checks.

Pure PyTorch (no Lightning import): :class:`ActivityRule` holds one rule, :func:`parse_rules`
turns the user's mapping or list into rules (validating everything that can be checked before a
model exists), and :func:`rule_penalty` computes one rule's penalty on one module output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_watch.outputs import batch_size, primary_tensor
from lightning_watch.selection import ModuleSelection

#: Keras' reduction (tf.keras 2 and current Keras 3): sum over the output's elements, divided by
#: the batch size, so the penalty's strength does not depend on the batch size.
SUM_OVER_BATCH_SIZE = "sum_over_batch_size"
#: The plain sum over the output's elements.
SUM = "sum"
REDUCTIONS = (SUM_OVER_BATCH_SIZE, SUM)

#: Keys a rule's mapping may hold.
RULE_KEYS = ("l1", "l2", "fn", "weight", "reduction", "output")

Weight = float | Callable[[int], float]
OutputSelector = int | Callable[[Any], Any] | None


def _check_coefficient(value: Any, arg: str, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{arg}` of rule {rule!r} must be a non-negative finite number, got {value!r}.")
    return float(value)


def check_weight(value: Any, rule: str, step: int | None = None) -> float:
    """Validate a rule's weight (a constant, or what its schedule returned at ``step``)."""
    where = "" if step is None else f" (returned by its schedule at step {step})"
    if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad:
        value = value.item()  # a schedule returning a tensor: evaluated once per batch on the host
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`weight` of rule {rule!r}{where} must be a non-negative finite number, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class ActivityRule:
    """One activity penalty: which modules, which penalty, how strong.

    The penalty of one call of a selected module, with ``out`` its (primary) output and ``B`` the
    batch size, is ``weight * (l1 * sum(|out|) + l2 * sum(out**2) + fn(out)) / B`` under the
    default reduction ``"sum_over_batch_size"`` (Keras' rule), and the same without ``/ B`` under
    ``"sum"``.

    Args:
        include: glob(s) over qualified module names (``"encoder.fc2"``, ``"encoder.*"``).
        types: module classes (or names such as ``"Linear"``) to select, in union with ``include``.
        exclude: glob(s) removed from the selection.
        l1: coefficient of the sum of absolute values (non-negative).
        l2: coefficient of the sum of squares (non-negative).
        fn: a callable ``fn(output) -> scalar tensor``, added to the l1/l2 terms and reduced like
            them (divided by the batch size under the default reduction).
        weight: a non-negative constant, or a function ``step -> weight`` of Lightning's logging
            step (a warm-up or a decay), evaluated once per training batch.
        reduction: ``"sum_over_batch_size"`` (default) or ``"sum"``.
        output: which part of a tuple output to penalize: ``None`` (the primary output: the
            first element, a ``PackedSequence``'s data), an index into the tuple, or a callable
            ``output -> tensor``.
        name: the rule's name in errors and logged tags; defaults to its ``include`` pattern(s).

    Raises:
        ValueError: if nothing is selected or penalized, or an argument is out of range.

    Example:
        >>> rule = ActivityRule(include="encoder.fc2", l2=1e-3)
        >>> rule.name, rule.l2, rule.reduction
        ('encoder.fc2', 0.001, 'sum_over_batch_size')
    """

    include: str | Sequence[str] | None = None
    types: Sequence[type | str] | type | str | None = None
    exclude: str | Sequence[str] | None = None
    l1: float = 0.0
    l2: float = 0.0
    fn: Callable[[Tensor], Tensor] | None = None
    weight: Weight = 1.0
    reduction: str = SUM_OVER_BATCH_SIZE
    output: OutputSelector = None
    name: str | None = None
    selection: ModuleSelection = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        selection = ModuleSelection.from_args(self.include, self.exclude, self.types)
        if not selection.include and not selection.types:
            raise ValueError(
                "an activity rule must select modules by `include` (name globs) or `types`, "
                f"got include={self.include!r}, types={self.types!r}."
            )
        name = self.name or ",".join(selection.include) or ",".join(t.__name__ for t in selection.types)
        object.__setattr__(self, "selection", selection)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "l1", _check_coefficient(self.l1, "l1", name))
        object.__setattr__(self, "l2", _check_coefficient(self.l2, "l2", name))
        if self.fn is not None and not callable(self.fn):
            raise ValueError(f"`fn` of rule {name!r} must be a callable `output -> scalar tensor`, got {self.fn!r}.")
        if not self.l1 and not self.l2 and self.fn is None:
            raise ValueError(f"rule {name!r} must set a penalty: `l1`, `l2` (positive) or `fn`, got none.")
        if not callable(self.weight):
            object.__setattr__(self, "weight", check_weight(self.weight, name))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"`reduction` of rule {name!r} must be one of {REDUCTIONS!r}, got {self.reduction!r}.")
        out = self.output
        if out is not None and not callable(out) and (isinstance(out, bool) or not isinstance(out, int)):
            raise ValueError(
                f"`output` of rule {name!r} must be None, a tuple index or a callable `output -> tensor`, got {out!r}."
            )

    def weight_at(self, step: int) -> float:
        """The rule's weight at Lightning's logging ``step`` (validated)."""
        if callable(self.weight):
            return check_weight(self.weight(step), self.name, step)
        return self.weight


def parse_rules(rules: Any) -> list[ActivityRule]:
    """Turn the user's rules into :class:`ActivityRule` objects, checking every one.

    Accepted forms: a mapping ``glob -> {"l1": ..., "l2": ..., "fn": ..., "weight": ...,
    "reduction": ..., "output": ...}`` or ``glob -> callable`` (the callable is ``fn``), a single
    :class:`ActivityRule`, or a sequence of them. Rule names must be unique (they name logged tags).

    Example:
        >>> [r.name for r in parse_rules({"encoder.*": {"l1": 1e-4}, "head": lambda out: out.abs().max()})]
        ['encoder.*', 'head']
    """
    if isinstance(rules, ActivityRule):
        parsed = [rules]
    elif isinstance(rules, Mapping):
        parsed = [_rule_from_item(pattern, spec) for pattern, spec in rules.items()]
    elif isinstance(rules, Sequence) and not isinstance(rules, str):
        parsed = []
        for rule in rules:
            if not isinstance(rule, ActivityRule):
                raise ValueError(f"`rules` entries must be ActivityRule objects, got {rule!r}.")
            parsed.append(rule)
    else:
        raise ValueError(
            "`rules` must be a mapping {module glob: {'l1': ..., 'l2': ...} or callable}, an ActivityRule "
            f"or a list of them, got {rules!r}."
        )
    if not parsed:
        raise ValueError(f"`rules` must hold at least one rule, got {rules!r}.")
    names = [rule.name for rule in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"rule names must be unique, got {duplicates!r} more than once; pass `name=` to tell them apart."
        )
    return parsed


def _rule_from_item(pattern: Any, spec: Any) -> ActivityRule:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"`rules` keys must be module name globs such as 'encoder.fc2', got {pattern!r}.")
    if callable(spec) and not isinstance(spec, Mapping):
        return ActivityRule(include=pattern, fn=spec)
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"rule {pattern!r} must be a mapping such as {{'l2': 1e-3}} or a callable `output -> scalar`, got {spec!r}."
        )
    unknown = [key for key in spec if key not in RULE_KEYS]
    if unknown:
        raise ValueError(f"rule {pattern!r} has unknown key(s) {unknown!r}; valid keys are {RULE_KEYS!r}.")
    return ActivityRule(include=pattern, name=pattern, **dict(spec))


# ---------------------------------------------------------------------- penalty computation
class OutputSums:
    """The shared reductions of one module call's output, each computed at most once.

    Two rules on one module (and the activation-scale statistic) share ``sum(out**2)``.
    """

    __slots__ = ("_abs", "_float", "_sq", "batch", "tensor")

    def __init__(self, tensor: Tensor, batch: int) -> None:
        self.tensor = tensor
        self.batch = batch
        self._sq: Tensor | None = None
        self._abs: Tensor | None = None
        self._float: Tensor | None = None

    def wide(self) -> Tensor:
        """The output in float32 (or wider), cast once.

        Half/bfloat16 sums over many elements round away digits, so reductions run in float32.
        One cast shared by every term also means their gradients are summed in float32 and
        rounded to the output's dtype once, as in a hand-written ``out.float()``.
        """
        if self._float is None:
            t = self.tensor
            self._float = t if t.dtype in (torch.float32, torch.float64) else t.float()
        return self._float

    def sum_sq(self) -> Tensor:
        if self._sq is None:
            self._sq = self.wide().pow(2).sum()
        return self._sq

    def sum_sq_detached(self) -> Tensor:
        """``sum(out**2)`` for measuring only: reuses the penalty's value, or builds no graph."""
        if self._sq is not None:
            return self._sq.detach()
        with torch.no_grad():
            return self.wide().pow(2).sum()

    def sum_abs(self) -> Tensor:
        if self._abs is None:
            self._abs = self.wide().abs().sum()
        return self._abs


def select_output(rule: ActivityRule, module_name: str, module: nn.Module, output: Any) -> tuple[Tensor, int]:
    """The tensor ``rule`` penalizes in ``output`` and the batch size it divides by.

    Raises:
        TypeError: if there is no floating-point tensor to penalize (naming rule and module).
    """
    part = output
    if callable(rule.output):
        part = rule.output(output)
    elif isinstance(rule.output, int):
        if not isinstance(output, (tuple, list)) or not -len(output) <= rule.output < len(output):
            raise TypeError(
                f"`output` of rule {rule.name!r} is index {rule.output}, but module {module_name!r} returned "
                f"{type(output).__name__} (not a tuple with that index)."
            )
        part = output[rule.output]
    tensor = primary_tensor(part)
    if tensor is None:
        raise TypeError(
            f"rule {rule.name!r} penalizes module {module_name!r}, which returned {type(part).__name__}, "
            "not a tensor; select another module or pass `output=` to pick a tensor."
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"rule {rule.name!r} penalizes module {module_name!r}, whose output has dtype {tensor.dtype}; "
            "activity penalties need floating-point outputs (select the layer after it)."
        )
    # The same module reports the batch dimension (batch_first, PackedSequence) for every part.
    batch = batch_size(module, part)
    if batch is None:
        batch = int(tensor.shape[0]) if tensor.dim() >= 1 else 1
    return tensor, max(batch, 1)


def rule_penalty(rule: ActivityRule, sums: OutputSums, weight: float) -> Tensor:
    """``weight * (l1 * sum|out| + l2 * sum out**2 + fn(out))``, reduced as the rule says (a 0-d float32+ tensor).

    Raises:
        ValueError: if ``fn`` returns something other than a scalar floating-point tensor.

    Example:
        >>> out = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
        >>> # 2.0 * (0.5 * 6 + 0.1 * 14) / 2
        >>> rule_penalty(ActivityRule(include="x", l1=0.5, l2=0.1), OutputSums(out, batch=2), weight=2.0)
        tensor(4.4000)
    """
    total: Tensor | None = None
    if rule.l2:
        total = rule.l2 * sums.sum_sq()
    if rule.l1:
        term = rule.l1 * sums.sum_abs()
        total = term if total is None else total + term
    if rule.fn is not None:
        value = rule.fn(sums.tensor)
        if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
            shown = (
                f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
                if isinstance(value, Tensor)
                else repr(value)
            )
            raise ValueError(
                f"`fn` of rule {rule.name!r} must return a scalar (0-d) floating-point tensor, got {shown}."
            )
        value = value if value.dtype in (torch.float32, torch.float64) else value.float()
        total = value if total is None else total + value
    if rule.reduction == SUM_OVER_BATCH_SIZE:
        weight = weight / sums.batch
    return total * weight
