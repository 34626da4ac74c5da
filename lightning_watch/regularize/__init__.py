"""Activity penalties (Keras' ``activity_regularizer``) for any LightningModule, by configuration.

- :mod:`~lightning_watch.regularize.rules`: ``ActivityRule`` and the penalty arithmetic;
- :mod:`~lightning_watch.regularize.backward`: how the penalty joins Lightning's backward;
- :mod:`~lightning_watch.regularize.callback`: ``ActivityRegularizer``, the callback.
"""

from lightning_watch.regularize.callback import ActivityRegularizer
from lightning_watch.regularize.rules import ActivityRule

__all__ = ["ActivityRegularizer", "ActivityRule"]
