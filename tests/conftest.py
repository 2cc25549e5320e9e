"""Session fixtures: a tiny random Qwen2.5-VL built once, and a small dataset per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two torch threads on two cores; never more (oversubscription slows torch by orders of magnitude).
os.environ.setdefault("OMP_NUM_THREADS", "2")

from helpers import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from vlmtune.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.5-vl")


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")
