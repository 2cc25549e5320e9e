"""`vlmtune export`: the merged checkpoint computes what base + adapter computes, and loads as a plain model
of the base's family with the base's own chat template (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE with and
without LoRA on its experts)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers import assert_one_line_error, make_dataset, run_cli
from vlmtune.config import FinetuneConfig
from vlmtune.data.encode import Collator, encode_prompt, load_images, prompt_messages
from vlmtune.data.loader import load_datasets
from vlmtune.data.processor import load_processor
from vlmtune.model.adapters import apply_finetuning
from vlmtune.model.load import load_model

ADAPTER_MAX_PIXELS = 128 * 128  # differs from the tiny model's default: the export must keep the adapter's
CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_vl_moe+experts"])
def case(request, tiny_models):
    arch, _, experts = request.param.partition("+")
    return arch, tiny_models(arch), bool(experts)


@pytest.fixture(scope="module")
def tiny_model_dir(case):
    return case[1]


@pytest.fixture(scope="module")
def adapter_dir(case, tmp_path_factory):
    """A LoRA adapter as vlmtune trains it (language-model linears, r=8; the experts too where asked) + a fully
    trained lm_head copy, with random non-zero weights (a fresh LoRA's B is zero, which would make any merge
    trivially right)."""
    _, tiny_model_dir, experts = case
    out = tmp_path_factory.mktemp("export") / "adapter"
    torch.manual_seed(1)
    model = apply_finetuning(load_model(tiny_model_dir), FinetuneConfig(lora_rank=8, lora_alpha=16,
                                                                        additional_target="lm_head",
                                                                        lora_target_experts=experts),
                             log=lambda *_: None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(out)
    load_processor(tiny_model_dir, max_pixels=ADAPTER_MAX_PIXELS).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exported(tiny_model_dir, adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    result = run_cli("export", "--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path",
                     str(adapter_dir), "--export_dir", str(out), "--export_dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "exported to" in result.stdout
    return out


@pytest.fixture(scope="module")
def batch(tiny_model_dir, adapter_dir, tmp_path_factory):
    """Three prompts with images of two sizes, left padded: what prediction runs."""
    processor = load_processor(adapter_dir)  # the adapter's pixel limits
    data = make_dataset(tmp_path_factory.mktemp("export-data") / "data", n=3)
    conversations = load_datasets("my_dataset", str(data), None).conversations
    samples = [encode_prompt(prompt_messages(c), load_images(c, processor), processor) for c in conversations]
    out = Collator(processor, padding_side="left")(samples)
    out.pop("labels")
    assert out["pixel_values"].shape[0] > 0 and len({len(s) for s in samples}) > 1
    return out


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def test_merged_logits_equal_base_plus_adapter(case, tiny_model_dir, adapter_dir, exported, batch):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = logits(load_model(tiny_model_dir), batch)
    with_adapter = logits(PeftModel.from_pretrained(load_model(tiny_model_dir), str(adapter_dir)), batch)
    assert (with_adapter - base).abs().max() > 1e-2  # the adapter changes the answer: the test can fail
    # vlmtune's ordinary loading code: a plain model of the family, no adapter.
    merged_model = load_model(exported)
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    merged = logits(merged_model, batch)
    assert (merged - with_adapter).abs().max() < 1e-4
    # And plain transformers.
    plain = AutoModelForImageTextToText.from_pretrained(str(exported))
    assert type(plain).__name__ == CLASSES[case[0]]
    assert (logits(plain, batch) - with_adapter).abs().max() < 1e-4


def test_export_is_a_standard_checkpoint(case, tiny_model_dir, exported, adapter_dir, batch):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "chat_template.jinja", "chat_template.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == case[0] and config["dtype"] == "float32"
    with safe_open(str(exported / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and not [k for k in keys if "lora" in k or "base_layer" in k or "modules_to_save" in k]
    # The processor is the adapter's: same pixel limits, so the same image tokens as in training.
    processor = load_processor(exported)
    assert processor.max_pixels == ADAPTER_MAX_PIXELS
    assert processor.tokenizer.chat_template == load_processor(adapter_dir).tokenizer.chat_template
    # ... and the chat template is the base model's own, as `apply_chat_template` and vLLM read it.
    from transformers import AutoTokenizer

    own = (tiny_model_dir / "chat_template.jinja").read_text()
    assert (exported / "chat_template.jinja").read_text() == own
    assert json.loads((exported / "chat_template.json").read_text())["chat_template"] == own
    assert AutoTokenizer.from_pretrained(str(exported)).chat_template == own
    assert processor.template.name == load_processor(tiny_model_dir).template.name
    info = json.loads((exported / "vlmtune_export.json").read_text())
    assert info["adapter"] == str(adapter_dir.resolve()) and info["dtype"] == "float32"


def test_non_empty_export_dir_is_refused(tiny_model_dir, adapter_dir, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    result = run_cli("export", "--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path",
                     str(adapter_dir), "--export_dir", str(target))
    assert_one_line_error(result, "not empty", "--overwrite")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    result = run_cli("export", "--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path",
                     str(adapter_dir), "--export_dir", str(adapter_dir), "--overwrite")
    assert_one_line_error(result, "adapter directory itself")


def test_overwrite_in_bfloat16_replaces_stale_shards(tiny_model_dir, adapter_dir, tmp_path):
    from vlmtune.model.export import export

    target = tmp_path / "again"
    target.mkdir()
    (target / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    (target / "notes.txt").write_text("keep me")
    export(str(tiny_model_dir), str(adapter_dir), target, export_dtype="bfloat16", overwrite=True, log=lambda *_: None)
    names = {p.name for p in target.iterdir()}
    assert "model-00002-of-00002.safetensors" not in names and {"model.safetensors", "notes.txt"} <= names
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(target / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
