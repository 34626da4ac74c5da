"""Shared fixtures; the shared models, data, recorders and readers live in ``helpers.py``."""

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
