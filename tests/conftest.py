"""Shared fixtures; the shared models, data, recorders and readers live in ``helpers.py``.

The test folders mirror the package (``monitors/``, ``alerts/``, ``stats/``, ``views/``,
``regularize/``; cross-cutting Trainer setups in ``integration/``). They have no ``__init__.py``:
pytest's default import mode puts this folder on ``sys.path`` (so ``from helpers import ...``
works everywhere, also in spawned DDP workers), and test file names must therefore be unique
across folders.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TinyRegressor

from lightning_watch.warn import reset_warnings


@pytest.fixture(autouse=True)
def _fresh_warnings():
    reset_warnings()
    yield


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyRegressor()
