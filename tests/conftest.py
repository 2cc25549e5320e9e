"""Session fixtures: tiny random models of every family (each built once, when first asked for), and a
small dataset per test.

`tiny_model_dir` is the Qwen2.5-VL one; tests that must hold for every family take `family_model_dir`
(parametrised over ALL_ARCHS) or call `tiny_models(arch)` themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two torch threads on two cores; never more (oversubscription slows torch by orders of magnitude).
os.environ.setdefault("OMP_NUM_THREADS", "2")

from helpers import ALL_ARCHS, make_dataset  # noqa: E402
from label_adapters import make_rules_dataset, one_torch_thread, train_label_adapter  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _library_log_handler_outside_capsys():
    """transformers' log handler keeps the stderr it was made with: made inside a test's `capsys` (an in-process
    `vlmtune` run), it would write to that closed stream in a later test ("Logging error ... closed file")."""
    from transformers.utils import logging

    logging.get_logger("transformers")  # configures the library's root logger and its handler now


@pytest.fixture(scope="session", autouse=True)
def _encoded_store_in_the_session(tmp_path_factory):
    """Encoded-data stores (data.store) go to this session's own cache, for the CLI's subprocesses too."""
    from vlmtune.data.store import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("vlmtune-cache"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`tiny_models(arch)` → the directory of a tiny random model of that family, built once per session."""
    from vlmtune.model.tiny import build_tiny_model

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}") / f"tiny-{arch}", arch=arch)
        return built[arch]
    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_models) -> Path:
    return tiny_models("qwen2_5_vl")


@pytest.fixture(params=ALL_ARCHS)
def arch(request) -> str:
    """Each end-to-end family in turn (the test runs once per family)."""
    return request.param


@pytest.fixture
def family_model_dir(arch, tiny_models) -> Path:
    """The tiny model of `arch`."""
    return tiny_models(arch)


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def rules_dir(tmp_path_factory) -> Path:
    return make_rules_dataset(tmp_path_factory.mktemp("rules") / "data")


@pytest.fixture(scope="session")
def label_adapters(tiny_models, rules_dir, tmp_path_factory):
    """`label_adapters(arch, template=None)` → a label adapter trained on that family's tiny model (with that
    chat template, default the family's), once per session."""
    trained: dict[tuple, Path] = {}

    def get(arch: str, template: str | None = None, steps: int = 20) -> Path:
        key = (arch, template, steps)
        if key not in trained:
            with one_torch_thread():
                trained[key] = train_label_adapter(tiny_models(arch), rules_dir,
                                                   tmp_path_factory.mktemp(f"run-{arch}") / "adapter", steps=steps,
                                                   template=template)
        return trained[key]
    return get


@pytest.fixture(scope="session")
def label_adapter(label_adapters) -> Path:
    return label_adapters("qwen2_5_vl")


@pytest.fixture(scope="session")
def wider_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL with text hidden 256 (the label adapters are trained on hidden 128): another base of
    other shapes."""
    from vlmtune.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wide") / "tiny-256", text_hidden=256)


@pytest.fixture
def adapter_copy(label_adapter, tmp_path) -> Path:
    """A copy of the Qwen2.5-VL label adapter that a test may damage."""
    import shutil

    return Path(shutil.copytree(label_adapter, tmp_path / "adapter"))
