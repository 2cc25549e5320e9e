"""Shared fixtures: one small generated dataset per session, reused by the read-only tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune.synth import generate


def load(json_path: Path) -> tuple[list[dict], list[dict]]:
    records = json.loads(json_path.read_text(encoding="utf-8"))
    truth_path = json_path.with_name(json_path.stem + ".truth.jsonl")
    truths = [json.loads(line) for line in truth_path.read_text(encoding="utf-8").splitlines()]
    return records, truths


@pytest.fixture(name="load", scope="session")
def load_fixture():
    """The loader as a fixture, so test modules need not import this conftest by name."""
    return load


@pytest.fixture(scope="session")
def full_set(tmp_path_factory) -> tuple[Path, list[dict], list[dict]]:
    """60 samples, all seven rules active, 224 px (the size the tiny-model demo uses)."""
    out = tmp_path_factory.mktemp("synth_full")
    path = generate(60, out, seed=7, preset="full", name="full", image_size=224)
    return (out, *load(path))
