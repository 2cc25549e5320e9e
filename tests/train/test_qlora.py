"""QLoRA end to end on the tiny Qwen2.5-VL, in this process: 4-bit training lowers the loss, resumes exactly (and
refuses a resume on a full-precision base), predicts on the full-precision base by default and on the 4-bit one
when asked, and exports a merge onto the full-precision base — equal to base + adapter merged in full precision,
not to a merge into dequantized 4-bit weights. Loading on every family: tests/model/test_quantize.py."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_inline, write_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                 reason="bitsandbytes is not installed (pip install 'vlmtune[qlora]')")]

SETTINGS = dict(dataset="rules", template="qwen2_vl", image_max_pixels=12544, quantization_bit=4, max_steps=8,
                save_steps=4, logging_steps=1, learning_rate=5e-3, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, val_size=0, report_to="none", disable_tqdm=True, plot_loss=False)


def train(capsys, config: Path, *overrides: str):
    result = run_inline(capsys, "train", config, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_qlora_train_resume_predict_export(tiny_model_dir, rules_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "q.yaml", model_name_or_path=str(tiny_model_dir), dataset_dir=str(rules_dir),
                       output_dir=str(run), **SETTINGS)
    result = train(capsys, cfg)
    assert "QLoRA: the language model's linear layers load 4-bit nf4" in result.stdout
    losses = [json.loads(line)["loss"] for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
    # An ordinary peft adapter, plus the record of the base it trained on (in every checkpoint too).
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "LORA"
    for directory in (run, run / "checkpoint-4"):
        assert json.loads((directory / "vlmtune_quantization.json").read_text())["quantization_bit"] == 4
    adapter = load_file(run / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())

    check_resume(capsys, tmp_path, cfg, adapter)
    check_export(capsys, tmp_path, tiny_model_dir, run)
    check_server(run)
    check_predict(capsys, tmp_path, run, rules_dir)


def check_server(adapter: Path) -> None:
    """The servers' model: the adapter on the full-precision base (no bitsandbytes layer), said in one line."""
    import argparse

    from vlmtune.serve.common import ModelService

    settings = argparse.Namespace(model_name_or_path=None, adapter_name_or_path=str(adapter), image_max_pixels=None,
                                  image_min_pixels=None, bf16=False, fp16=False, attn_implementation="auto",
                                  device="cpu", default_system=None, max_new_tokens=8)
    lines = []
    service = ModelService.from_args(settings, log=lines.append)
    assert not any("bitsandbytes" in type(m).__module__ for m in service.engine.model.modules())
    assert [line for line in lines if line.startswith("QLoRA:")] == [
        f"QLoRA: {adapter} was trained on the 4-bit nf4 (double quantization) base; it is applied to the "
        f"full-precision base, not to dequantized 4-bit weights"]


def check_resume(capsys, tmp_path: Path, cfg: Path, expected: dict) -> None:
    """From checkpoint-4 the run ends with the uninterrupted run's adapter; without quantization_bit the
    checkpoint is refused in one line."""
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoint-4", resumed / "checkpoint-4")
    result = train(capsys, cfg, f"output_dir={resumed}", "resume_from_checkpoint=true")
    assert "Resumed from" in result.stdout
    got = load_file(resumed / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5
    refused = run_inline(capsys, "train", cfg, f"output_dir={resumed}", "resume_from_checkpoint=true",
                         "quantization_bit=null")
    assert refused.returncode == 1 and "quantization_bit was 4 there, None now" in refused.stderr


def check_predict(capsys, tmp_path: Path, adapter: Path, rules_dir: Path) -> None:
    """Full-precision base by default (said in one line), the 4-bit base with quantization_bit."""
    rows = {}
    for name, extra in (("full", ()), ("4bit", ("--quantization_bit", "4"))):
        save = tmp_path / f"{name}.jsonl"
        result = run_inline(capsys, "predict", "--adapter_name_or_path", adapter, "--dataset", "rules",
                            "--dataset_dir", rules_dir, "--max_samples", "4", "--save_name", save, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        said = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("QLoRA:")]
        assert len(said) == 1
        assert ("full-precision base" if name == "full" else "4-bit nf4 (double quantization) base it trained on") \
            in said[0]
        rows[name] = [json.loads(line) for line in save.read_text().splitlines()]
    assert len(rows["full"]) == len(rows["4bit"]) == 4
    assert all(set(r["scores"]) == {"满足要求", "不满足要求"} for r in rows["full"] + rows["4bit"])


def check_export(capsys, tmp_path: Path, base_dir: Path, adapter: Path) -> None:
    """The export is base + adapter merged in fp32 on the full-precision base; the 4-bit base's dequantized
    weights are measurably elsewhere."""
    from peft import PeftModel

    from vlmtune.families import family_of_dir
    from vlmtune.model.load import load_model
    from vlmtune.model.quantize import Quantization

    export_dir = tmp_path / "merged"
    result = run_inline(capsys, "export", "--adapter_name_or_path", adapter, "--export_dir", export_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("QLoRA:")]
    assert len(said) == 1 and "full-precision base, not to dequantized 4-bit weights" in said[0]
    info = json.loads((export_dir / "vlmtune_export.json").read_text())
    assert info["adapter_trained_quantized"]["quantization_bit"] == 4
    assert "quantization_config" not in json.loads((export_dir / "config.json").read_text())

    reference = PeftModel.from_pretrained(load_model(base_dir), str(adapter)).merge_and_unload().state_dict()
    exported = load_model(export_dir).state_dict()
    assert exported.keys() == reference.keys()
    assert max((exported[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6
    quantized = load_model(base_dir, quantization=Quantization(4))
    name = f"{family_of_dir(base_dir).layout.language_model}.layers.0.self_attn.q_proj"
    layer = quantized.get_submodule(name)
    import bitsandbytes.functional as bnbf

    dequantized = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    delta = reference[f"{name}.weight"] - load_model(base_dir).state_dict()[f"{name}.weight"]
    assert (exported[f"{name}.weight"] - (dequantized + delta)).abs().max().item() > 1e-4
