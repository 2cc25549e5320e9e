"""Command tests (`vlmtune <command>` as a user runs it, in this process or a shell) run on one torch thread: the
models are tiny (tests/label_adapters.py: one thread is as fast as two on an idle machine, many times faster on a
busy one)."""

from __future__ import annotations

import pytest

from label_adapters import one_torch_thread


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield
