"""The same model + adapter predict the same labels and P(label) (within 1e-4) on every supported transformers
version, and training runs on each. Needs a reference made under the newest version (`tests/versions.py`);
`.ci/run` makes one and runs this in a venv with the oldest supported transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import ALL_ARCHS, TEMPLATE_OF
from versions import predict, train

REFERENCE = os.environ.get("VLMTUNE_REFERENCE")
pytestmark = pytest.mark.skipif(not REFERENCE, reason="no reference predictions (VLMTUNE_REFERENCE; see "
                                                      "tests/versions.py, run by .ci/run)")


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_predictions_equal_the_newest_transformers(arch, tmp_path):
    import transformers

    root = Path(REFERENCE)
    model_dir, adapter = root / arch / "model", root / arch / "adapter"
    want = [json.loads(line) for line in (root / arch / "reference.jsonl").read_text().splitlines()]
    got = predict(model_dir, adapter, root / "data", tmp_path / "predictions.jsonl")
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["predict"] for r in got] == [r["predict"] for r in want]
    worst = max(abs(g["scores"][k] - w["scores"][k]) for g, w in zip(got, want) for k in w["scores"])
    assert worst <= 1e-4, (transformers.__version__, (root / "transformers_version").read_text(), worst)
    # and training runs on this version too
    train(model_dir, root / "data", tmp_path / "trained", TEMPLATE_OF[arch])
    assert (tmp_path / "trained" / "adapter_model.safetensors").is_file()
