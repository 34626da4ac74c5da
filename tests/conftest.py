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

from lightning_watch.pace import Pace
from lightning_watch.warn import reset_warnings


@pytest.fixture(autouse=True)
def _fresh_warnings():
    reset_warnings()
    yield


@pytest.fixture(autouse=True)
def _fixed_cadence(request, monkeypatch):
    """Tests read values at known steps, on tiny models whose statistics cost far more than 2 % of a
    step: the time budget's stretch (lightning_watch/pace.py) is off, except in tests marked ``pace``,
    which drive it with known clocks and check it."""
    if "pace" not in request.keywords:
        monkeypatch.setattr(Pace, "decide", lambda self, share: None)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyRegressor()
