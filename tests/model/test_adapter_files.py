"""One reader for an adapter directory (`model.adapter_files`): a whole predict run reads adapter_config.json once,
and an adapter rewritten in place (train, then predict) is read again."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import run_inline
from vlmtune.errors import VlmtuneError
from vlmtune.model import adapter_files as module


@pytest.fixture
def counted(monkeypatch):
    """The paths `adapter_files` reads its JSON from, in order (a fresh cache)."""
    module._read.cache_clear()
    reads = []
    original = module.read_json_object

    def read(path):
        reads.append(path.name)
        return original(path)

    monkeypatch.setattr(module, "read_json_object", read)
    yield reads
    module._read.cache_clear()


def test_a_predict_run_reads_the_adapter_config_once(tmp_path, capsys, counted, tiny_model_dir, label_adapter,
                                                     rules_dir):
    result = run_inline(capsys, "predict", "--model_name_or_path", tiny_model_dir, "--adapter_name_or_path",
                        label_adapter, "--dataset", "rules", "--dataset_dir", rules_dir, "--max_samples", "2",
                        "--save_name", tmp_path / "p.jsonl")
    assert result.returncode == 0, result.stderr
    assert counted.count("adapter_config.json") == 1, counted  # engine, template, pixels, fingerprint: one read


def test_what_the_adapter_says_about_itself(counted, label_adapter):
    files = module.adapter_files(label_adapter)
    assert files.base_model is not None and files.peft_type == "LORA" and files.rank == 8
    assert files.weights.name == "adapter_model.safetensors"
    assert files.max_pixels == 112 * 112 and files.template is not None  # saved with it by training
    assert module.adapter_files(label_adapter) is files  # cached while the files are unchanged


def test_a_rewritten_adapter_is_read_again(tmp_path, counted, label_adapter):
    adapter = shutil.copytree(label_adapter, tmp_path / "adapter")
    assert module.adapter_files(adapter).rank == 8
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 4, "pad": "x" * 10}))
    assert module.adapter_files(adapter).rank == 4


def test_not_an_adapter_is_one_line(tmp_path, counted):
    with pytest.raises(VlmtuneError, match="adapter directory not found"):
        module.adapter_files(tmp_path / "absent")
    with pytest.raises(VlmtuneError, match="no adapter_config.json"):
        module.adapter_files(tmp_path)
