"""What an alert engine is told to do: actions, settings and user rules, checked at construction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_watch.alerts.alert import CODES
from lightning_watch.alerts.registry import DEFAULTS
from lightning_watch.alerts.rules import Rule
from lightning_watch.cadence import check_interval

#: what a raised alert may do, per code
ACTIONS = ("warn", "stop", "raise")

#: settings that count steps or batches (positive integers); every other setting is a non-negative number
_INTEGER_SETTINGS = frozenset({"patience", "min_steps"})


@dataclass
class AlertConfig:
    """Validated configuration of an :class:`~lightning_watch.alerts.AlertEngine`.

    Example:
        >>> config = AlertConfig.from_args(actions={"non_finite_loss": "stop"}, settings={"dead_units": False})
        >>> config.action("non_finite_loss"), config.action("dead_units"), config.enabled("dead_units")
        ('stop', 'warn', False)
        >>> AlertConfig.from_args(default_action="halt")
        Traceback (most recent call last):
        ...
        ValueError: `default_action` must be one of 'warn', 'stop', 'raise', got 'halt'.
    """

    actions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    disabled: set[str] = field(default_factory=set)
    rules: list[Rule] = field(default_factory=list)
    default_action: str = "warn"
    label_batches: int = 4
    history: int = 64

    @classmethod
    def from_args(
        cls,
        actions: Mapping[str, str] | None = None,
        settings: Mapping[str, Mapping[str, float] | bool] | None = None,
        rules: Sequence[Rule] | Rule = (),
        default_action: str = "warn",
        label_batches: int = 4,
        history: int = 64,
    ) -> AlertConfig:
        user_rules = check_rules(rules)
        known = list(CODES) + [c for rule in user_rules for c in getattr(rule, "codes", ())]
        default_action = check_action("default_action", default_action)
        checked = {
            check_code("actions", c, known): check_action(f"actions[{c!r}]", a) for c, a in (actions or {}).items()
        }
        merged, disabled = merge_settings(settings or {}, known)
        return cls(
            actions=checked,
            settings=merged,
            disabled=disabled,
            rules=user_rules,
            default_action=default_action,
            label_batches=check_interval("label_batches", label_batches, allow_none=False),
            history=check_interval("history", history, allow_none=False),
        )

    def action(self, code: str) -> str:
        return self.actions.get(code, self.default_action)

    def enabled(self, code: str) -> bool:
        return code not in self.disabled

    @property
    def may_stop_or_raise(self) -> bool:
        """Whether some code may stop or raise (then DDP ranks must agree on it)."""
        return bool({*self.actions.values(), self.default_action} & {"stop", "raise"})

    @property
    def may_raise(self) -> bool:
        return "raise" in {*self.actions.values(), self.default_action}


def check_code(arg: str, code: Any, known: Sequence[str]) -> str:
    if code not in known:
        raise ValueError(f"`{arg}` key must be an alert code, got {code!r}. Valid codes: {', '.join(known)}.")
    return code


def check_action(arg: str, action: Any) -> str:
    if action not in ACTIONS:
        raise ValueError(f"`{arg}` must be one of {', '.join(map(repr, ACTIONS))}, got {action!r}.")
    return action


def check_rules(rules: Any) -> list[Rule]:
    if callable(rules) or not isinstance(rules, Iterable):
        rules = [rules]
    rules = list(rules)
    for rule in rules:
        if not callable(rule):
            raise ValueError(f"`rules` must be callables `rule(snapshot, context) -> alerts`, got {rule!r}.")
    return rules


def merge_settings(user: Mapping[str, Any], known: Sequence[str]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Defaults updated by the user's settings; ``code -> False`` switches a code off."""
    settings = {code: dict(params) for code, params in DEFAULTS.items()}
    disabled: set[str] = set()
    for code, params in user.items():
        check_code("settings", code, known)
        if params is False:
            disabled.add(code)
            continue
        if params is True:
            continue
        if not isinstance(params, Mapping):
            raise ValueError(f"`settings[{code!r}]` must be a dict of settings or False, got {params!r}.")
        valid = DEFAULTS.get(code)
        for name, value in params.items():
            arg = f"settings[{code!r}][{name!r}]"
            if valid is not None and name not in valid:
                raise ValueError(f"`{arg}` is not a setting of {code!r}; valid settings: {', '.join(valid)}.")
            if name in _INTEGER_SETTINGS:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"`{arg}` must be a positive integer, got {value!r}.")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"`{arg}` must be a non-negative number, got {value!r}.")
        settings.setdefault(code, {}).update(params)
    return settings, disabled
