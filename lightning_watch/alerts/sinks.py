"""Where a raised alert goes: Python logging, ``warnings``, ``alerts.jsonl`` and the loggers' text.

Everything here runs on rank zero only (the alert lists are the same on every rank), and
receives plain host values.

Each alert is *said* once on the terminal: as an :class:`AlertWarning` (warning/error, once per code
and module), attributed to the user's ``trainer.fit(...)`` line rather than to our files. The
logging record of every raise (logger ``lightning_watch.alerts``) is for handlers the user
configures; a ``NullHandler`` keeps Python's last-resort handler from printing it a second time.
"""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl

from lightning_watch.alerts.alert import JSONL_NAME, Alert
from lightning_watch.warn import say, warn_write_failed
from lightning_watch.writers import add_text, run_log_dir

#: the logger every alert is sent to
logger = logging.getLogger("lightning_watch.alerts")
# the terminal hears each alert from `warnings`; without this, logging's last resort repeats it
logger.addHandler(logging.NullHandler())

#: file name of the JSON-lines record in the trainer's log directory

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class AlertWarning(UserWarning):
    """Category of the ``warnings`` an alert emits.

    Kept apart from :class:`~lightning_watch.WatchWarning` (which says the *tool* met something
    odd) because an alert is a finding about the *run*; silence both with their categories.
    """


class AlertSinks:
    """Writes each raised alert to every sink; ``warnings`` once per code and module."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._warned: set[tuple[str, str | None]] = set()

    def start(self, trainer: pl.Trainer) -> None:
        """Resolve the log directory (on every rank: ``trainer.log_dir`` is a collective under DDP)."""
        log_dir = run_log_dir(trainer)
        self.path = os.path.join(log_dir, JSONL_NAME) if log_dir else None

    def emit(self, trainer: pl.Trainer, alert: Alert) -> None:
        if not trainer.is_global_zero:
            return
        logger.log(_LEVELS[alert.severity], alert.summary())
        if alert.severity != "info" and alert.key not in self._warned:
            self._warned.add(alert.key)
            say(alert.summary(), AlertWarning)
        if self.path is not None:
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(alert.to_json() + "\n")
            except Exception as err:  # a read-only or full disk must not stop training
                warn_write_failed(self.path, err, "Alerts still go to Python logging and `watch.alerts`.")
        add_text(trainer, alert_tag(alert), _markdown(alert), max(alert.step, 0))


def alert_tag(alert: Alert) -> str:
    """Text tag of an alert: one per code and module, so two modules' alerts at one step both show.

    Example:
        >>> alert_tag(Alert("dead_units", "warning", 9, 0, "net.1", 0.8, 0.7, "m", "h"))
        'alerts/dead_units/net.1'
    """
    return f"alerts/{alert.code}" if alert.module is None else f"alerts/{alert.code}/{alert.module}"


def _markdown(alert: Alert) -> str:
    where = f" in `{alert.module}`" if alert.module else ""
    return (
        f"**{alert.severity}** `{alert.code}`{where} at step {alert.step} (epoch {alert.epoch}): {alert.message}  \n"
        f"*Try:* {alert.hint}  \n"
        f"value = {alert.value:.4g}, threshold = {alert.threshold:.4g}"
    )
