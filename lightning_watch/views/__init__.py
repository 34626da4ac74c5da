"""Views: the end-of-fit health report, TensorBoard pictures, and the event-file reader behind the CLI."""

from lightning_watch.views.health import HealthReport, LayerRow
from lightning_watch.views.history import History, Track

__all__ = ["HealthReport", "History", "LayerRow", "Track"]
