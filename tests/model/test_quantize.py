"""QLoRA loading (`vlmtune.model.quantize`): what bitsandbytes quantizes on every family, what it leaves alone,
LoRA training on top, the record saved with the adapter, and the one-line errors. The end-to-end run (train →
resume → predict → export) is tests/train/test_qlora.py."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import ALL_ARCHS, ONE_PER_FAMILY, assert_one_line_error, run_inline, write_config
from vlmtune.config import FinetuneConfig, build_config
from vlmtune.errors import VlmtuneError
from vlmtune.families import family_of_type
from vlmtune.model.adapters import apply_finetuning, count_parameters
from vlmtune.model.load import load_model
from vlmtune.model.quantize import (RECORD, Quantization, quantization_of, quantization_of_model, read_record,
                                    save_record, skip_modules)

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (pip install 'vlmtune[qlora]')")


def linear_kinds(model, layout) -> dict[str, set[str]]:
    """Class names of the linear layers in each part: language model, vision tower (projector included), lm_head."""
    kinds: dict[str, set[str]] = {"language_model": set(), "vision_tower": set(), "lm_head": set()}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for part in ("language_model", "vision_tower", "lm_head"):
            prefix = getattr(layout, part)
            if name == prefix or name.startswith(prefix + "."):
                kinds[part].add(type(module).__name__)
    return kinds


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_only_the_language_model_is_quantized(tiny_models, arch, bits):
    """Every linear layer of the language model is bitsandbytes' (Linear4bit / Linear8bitLt); the vision tower,
    the projector and lm_head stay torch Linear in the compute dtype — on every family of the registry."""
    layout = family_of_type(arch).layout
    model = load_model(tiny_models(arch), quantization=Quantization(bits))
    kinds = linear_kinds(model, layout)
    assert kinds["language_model"] == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    assert kinds["vision_tower"] == {"Linear"} and kinds["lm_head"] == {"Linear"}
    assert type(model.get_submodule(layout.projector)).__name__ != "Linear4bit"
    assert all(type(m).__name__ == "Linear" for m in model.get_submodule(layout.projector).modules()
               if isinstance(m, torch.nn.Linear))
    assert quantization_of_model(model) == Quantization(bits)
    kept = [p for n, p in model.named_parameters() if not n.startswith(layout.language_model + ".")]
    assert kept and all(p.dtype == torch.float32 for p in kept)


@needs_bnb
@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_lora_on_a_4bit_base_trains_in_fp32(tiny_models, arch):
    """LoRA on the 4-bit language model: fp32 adapter weights, gradients only there, and the parameter count of
    the packed 4-bit weights is the model's (bitsandbytes stores two weights per byte)."""
    torch.manual_seed(0)
    full = count_parameters(load_model(tiny_models(arch)))[1]
    model = apply_finetuning(load_model(tiny_models(arch), quantization=Quantization(4)),
                             FinetuneConfig(lora_rank=4), log=lambda _: None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    trained, total = count_parameters(model)
    assert total == full + trained
    ids = torch.randint(0, 100, (2, 12))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all("lora_" in n for n, p in model.named_parameters() if p.grad is not None)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@needs_bnb
def test_8bit_lora_steps_lower_the_loss(tiny_model_dir):
    """8-bit (LLM.int8) base: forward and backward run on this machine, and a few steps lower the loss."""
    torch.manual_seed(0)
    model = apply_finetuning(load_model(tiny_model_dir, quantization=Quantization(8)),
                             FinetuneConfig(lora_rank=8), log=lambda _: None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (2, 12))
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_skipped_modules_are_the_family_layout(arch):
    """What bitsandbytes leaves alone is named by the family record, not by a list of model types here."""
    layout = family_of_type(arch).layout
    assert set(skip_modules(layout)) == {layout.vision_tower, layout.projector, layout.lm_head}


def test_record_round_trip_and_damage(tmp_path):
    """The record next to a QLoRA adapter holds the run's own keys; a plain adapter has none; a damaged one is
    a one-line error."""
    class Quantized:
        class config:  # noqa: N801 — shaped like a transformers config
            quantization_config = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                   "bnb_4bit_use_double_quant": False}

    save_record(Quantized(), tmp_path)
    assert json.loads((tmp_path / RECORD).read_text()) == {
        "quantization_bit": 4, "quantization_method": "bnb", "quantization_type": "fp4", "double_quantization": False}
    assert read_record(tmp_path) == Quantization(4, "fp4", False)
    assert read_record(tmp_path).label == "4-bit fp4"
    save_record(torch.nn.Linear(2, 2), tmp_path / "plain")  # not quantized: nothing written
    assert read_record(tmp_path / "plain") is None
    (tmp_path / RECORD).write_text('{"quantization_bit": 3}')
    with pytest.raises(VlmtuneError, match="quantization_bit must be 4 or 8"):
        read_record(tmp_path)


def test_missing_bitsandbytes_is_one_line_naming_the_extra(monkeypatch, capsys, tiny_model_dir, rules_dir, tmp_path):
    """`vlmtune train` with quantization_bit and no bitsandbytes: one line naming the extra, before the data."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    cfg = write_config(tmp_path / "q.yaml", model_name_or_path=str(tiny_model_dir), dataset_dir=str(rules_dir),
                       dataset="rules", template="qwen2_vl", output_dir=str(tmp_path / "out"), quantization_bit=4)
    assert_one_line_error(run_inline(capsys, "train", cfg), "quantization_bit: 4", "pip install 'vlmtune[qlora]'")
    assert quantization_of(build_config({}).model) is None  # no quantization asked: bitsandbytes not needed


@pytest.mark.parametrize("values, fragment", [
    ({"quantization_bit": 4, "finetuning_type": "full"}, "needs finetuning_type: lora"),
    ({"quantization_bit": 4, "deepspeed": "ds_z3_config.json"}, "does not run under DeepSpeed"),
    ({"quantization_bit": 2}, "quantization_bit"),
    ({"quantization_bit": 4, "quantization_method": "hqq"}, "quantization_method"),
])
def test_settings_that_cannot_run_are_refused(values, fragment):
    with pytest.raises(VlmtuneError, match=fragment):
        build_config(values)


def test_export_refuses_a_quantized_base(tmp_path):
    """Export merges onto full-precision weights only: a base checkpoint saved quantized is refused."""
    from vlmtune.model.export import refuse_quantized_base

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}}))
    with pytest.raises(VlmtuneError, match="quantized checkpoint"):
        refuse_quantized_base(Path(tmp_path))


def test_4bit_keys_without_4bit_are_said_to_do_nothing():
    from vlmtune.config import inert_settings

    def notes(values):
        return [n for n in inert_settings(build_config(values), 1, False) if "quantization_type" in n]

    assert notes({"quantization_bit": 8, "quantization_type": "fp4"}) and notes({"double_quantization": False})
    assert not notes({"quantization_bit": 4, "quantization_type": "fp4", "double_quantization": False})
