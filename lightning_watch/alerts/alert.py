"""The alert record: what was seen, where, when, how sure, and what to try."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class AlertCode(str, Enum):
    """Symptom names of the built-in rules and checks (stable, public)."""

    NON_FINITE_LOSS = "non_finite_loss"
    NON_FINITE_GRADIENTS = "non_finite_gradients"
    EXPLODING_GRADIENTS = "exploding_gradients"
    VANISHING_GRADIENTS = "vanishing_gradients"
    DEAD_UNITS = "dead_units"
    SATURATED_UNITS = "saturated_units"
    ACTIVATION_EXPLOSION = "activation_explosion"
    STALLED_PARAMETERS = "stalled_parameters"
    LARGE_UPDATES = "large_updates"
    TINY_UPDATES = "tiny_updates"
    LOSS_PLATEAU = "loss_plateau"
    LOSS_DIVERGENCE = "loss_divergence"
    UNSHUFFLED_DATA = "unshuffled_data"
    BATCH_MIXING = "batch_mixing"
    SMALL_BATCH_NORM = "small_batch_norm"
    UNSEEDED_RUN = "unseeded_run"
    REPLICAS_OUT_OF_SYNC = "replicas_out_of_sync"
    # detectors (lightning_watch/alerts/detectors.py) and their fit-time checks
    GRADIENTS_NOT_ZEROED = "gradients_not_zeroed"
    DISCONNECTED_PARAMETERS = "disconnected_parameters"
    UNNORMALIZED_INPUTS = "unnormalized_inputs"
    LABEL_IMBALANCE = "label_imbalance"
    NOISY_TRAINING = "noisy_training"
    CHANCE_LEVEL_LOSS = "chance_level_loss"
    RECTIFIED_OUTPUTS = "rectified_outputs"
    SYMMETRIC_UNITS = "symmetric_units"
    STILL_IMPROVING = "still_improving"
    REGRESSION_ON_CLASS_INDICES = "regression_on_class_indices"
    PROBABILITY_OUTPUTS = "probability_outputs"
    EXTREME_DROPOUT = "extreme_dropout"
    FROZEN_LAYERS = "frozen_layers"
    SATURATED_GATES = "saturated_gates"
    TRAIN_VAL_INPUT_SHIFT = "train_val_input_shift"
    FROZEN_PARAMETERS = "frozen_parameters"
    FRAMEWORK_WARNING = "framework_warning"


#: every built-in code, as plain strings
CODES: tuple[str, ...] = tuple(code.value for code in AlertCode)

#: the file, in the run's log directory, that holds one JSON line per raised alert
JSONL_NAME = "alerts.jsonl"

#: severities, least to most severe
SEVERITIES: tuple[str, ...] = ("info", "warning", "error")


def severity_rank(severity: str) -> int:
    """Position of ``severity`` in :data:`SEVERITIES` (higher is more severe)."""
    return SEVERITIES.index(severity)


@dataclass
class Alert:
    """One diagnosis: a symptom seen at a step, its evidence, and what to try.

    Attributes:
        code: symptom name (see :class:`AlertCode`; user rules may use their own).
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        step: Lightning's logging step when raised (``-1`` before the first step).
        epoch: epoch when raised.
        module: qualified module name, or ``None`` for a whole-model symptom.
        value: the measured evidence.
        threshold: the bound ``value`` crossed.
        message: one plain sentence saying what was seen.
        hint: what to try.
        extra: optional additional evidence (plain JSON-able values).

    Example:
        >>> alert = Alert("dead_units", "warning", step=49, epoch=0, module="net.1", value=0.9,
        ...               threshold=0.7, message="90% of net.1's units never fired.", hint="Try LeakyReLU.")
        >>> alert.key
        ('dead_units', 'net.1')
        >>> '"code": "dead_units"' in alert.to_json()
        True
    """

    code: str
    severity: str
    step: int
    epoch: int
    module: str | None
    value: float
    threshold: float
    message: str
    hint: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.code, AlertCode):
            self.code = self.code.value
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {list(SEVERITIES)}, got {self.severity!r}.")

    @property
    def key(self) -> tuple[str, str | None]:
        """``(code, module)``: alerts are deduplicated on this key."""
        return (self.code, self.module)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
        out = asdict(self)
        for name in ("value", "threshold"):
            out[name] = _json_float(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        data = dict(data)
        for name in ("value", "threshold"):
            data[name] = float(data[name])
        return cls(**data)

    def to_json(self) -> str:
        """One line of strict JSON (``alerts.jsonl`` holds one per line)."""
        return json.dumps(self.to_dict(), allow_nan=False, default=str)

    def summary(self) -> str:
        """``[warning] dead_units in net.1 at step 49: <message> Try: <hint>``."""
        where = f" in {self.module}" if self.module else ""
        return f"[{self.severity}] {self.code}{where} at step {self.step}: {self.message} Try: {self.hint}"


def _json_float(value: float) -> float | str:
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class AlertError(RuntimeError):
    """Raised by the ``"raise"`` action; the alert is in ``.alert``."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(alert.summary())
        self.alert = alert
