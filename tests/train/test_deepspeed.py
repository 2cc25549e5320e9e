"""`deepspeed: ds_config.json`: the config reaches accelerate's DeepSpeedPlugin with its "auto" values
filled from ours; clear errors without deepspeed or without CUDA; a real ZeRO run on a GPU."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from vlmtune.config import load_config
from vlmtune.errors import VlmtuneError
from vlmtune.train.loop import deepspeed_plugin

from helpers import REPO, assert_one_line_error, run_cli

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def ds_json(tmp_path, stage=2, **values):
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "train_batch_size": "auto", "bf16": {"enabled": "auto"},
              "zero_optimization": {"stage": stage}, **values}
    path = tmp_path / f"ds_z{stage}.json"
    path.write_text(json.dumps(config))
    return path


def config_with(train_config, ds_path, *overrides):
    return load_config(train_config(), [f"deepspeed={ds_path}", "per_device_train_batch_size=2",
                                        "gradient_accumulation_steps=4", "max_grad_norm=0.5", *overrides])


@pytest.fixture
def deepspeed_available(monkeypatch):
    """The plugin itself needs no deepspeed import: pretend it is installed where it is not."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_deepspeed_available", lambda: True)


def test_auto_values_filled_from_our_config(tmp_path, train_config, deepspeed_available, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    plugin = deepspeed_plugin(config_with(train_config, ds_json(tmp_path, stage=3)), has_cuda=True)
    ds = plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 2 * 4 * 2
    assert ds["gradient_clipping"] == 0.5
    assert plugin.zero_stage == 3


def test_explicit_values_must_agree(tmp_path, train_config, deepspeed_available):
    path = ds_json(tmp_path, gradient_accumulation_steps=16)
    with pytest.raises(VlmtuneError, match="gradient_accumulation_steps is 16 there but 4"):
        deepspeed_plugin(config_with(train_config, path), has_cuda=True)
    path = ds_json(tmp_path, gradient_accumulation_steps=4)  # agreeing values are fine
    assert deepspeed_plugin(config_with(train_config, path), has_cuda=True).deepspeed_config[
        "gradient_accumulation_steps"] == 4


def test_missing_deepspeed_is_a_clear_error(tmp_path, train_config, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_deepspeed_available", lambda: False)
    with pytest.raises(VlmtuneError, match=r"DeepSpeed is not installed; pip install 'vlmtune\[deepspeed\]'"):
        deepspeed_plugin(config_with(train_config, ds_json(tmp_path)), has_cuda=True)


def test_cpu_and_unreadable_config_are_clear_errors(tmp_path, train_config, deepspeed_available):
    with pytest.raises(VlmtuneError, match="needs CUDA GPUs"):
        deepspeed_plugin(config_with(train_config, ds_json(tmp_path)), has_cuda=False)
    with pytest.raises(VlmtuneError, match="cannot read the DeepSpeed config"):
        deepspeed_plugin(config_with(train_config, tmp_path / "missing.json"), has_cuda=True)


@pytest.mark.skipif(torch.cuda.is_available() and HAS_DEEPSPEED, reason="deepspeed runs here: see test_zero_run")
def test_train_command_reports_it_without_a_traceback(tmp_path, train_config):
    """Without deepspeed or without CUDA: one error line naming the key, exit code 1, before any work."""
    result = run_cli("train", str(train_config(deepspeed=str(ds_json(tmp_path)))), timeout=300)
    assert_one_line_error(result, "deepspeed:", "ds_z2.json")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real ZeRO run needs a CUDA GPU")
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'vlmtune[deepspeed]')")
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run(tmp_path, train_config, stage):
    out = tmp_path / f"out-z{stage}"
    cfg = train_config(deepspeed=str(ds_json(tmp_path, stage=stage)), output_dir=str(out), bf16=True,
                       num_train_epochs=1, save_strategy="epoch", eval_strategy="epoch")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "vlmtune",
                             "train", str(cfg)], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert any((p / "deepspeed").is_dir() for p in out.glob("checkpoint-*"))
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(loss == loss for loss in losses)  # finite, not NaN
    assert json.loads((out / "all_results.json").read_text())["eval_loss"] > 0
