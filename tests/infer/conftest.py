"""Prediction tests run on one torch thread (the label-adapter fixtures they use are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from label_adapters import one_torch_thread


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield
