from pathlib import Path

import pytest
import torch

from helpers import REPO, run_cli
from vlmtune.config import FinetuneConfig
from vlmtune.data.encode import Collator, encode
from vlmtune.data.loader import load_datasets
from vlmtune.data.processor import load_processor
from vlmtune.model.adapters import apply_finetuning, count_parameters, parameter_summary
from vlmtune.model.load import load_model

SEVEN_B = REPO / "tests" / "fixtures" / "qwen2_5_vl_7b"


def test_7b_lora_count_from_config_only_directory():
    """Qwen2.5-VL-7B, r=8 on all language-model linears: LLaMA-Factory's exact numbers, no weights read."""
    assert sorted(p.name for p in SEVEN_B.iterdir()) == ["config.json"]
    result = run_cli("inspect", "--model_name_or_path", str(SEVEN_B), "--finetuning_type", "lora",
                     "--lora_rank", "8", "--lora_target", "all")
    assert result.returncode == 0, result.stderr
    assert "trainable params: 20,185,088 || all params: 8,312,351,744 || trainable%: 0.2428" in result.stdout
    assert "Found linear modules: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in result.stdout


@pytest.fixture(scope="module")
def batch_of_two(tiny_model_dir, tmp_path_factory):
    """Two samples whose images have different sizes (320×240 and 224×224)."""
    from helpers import make_dataset

    data_dir = make_dataset(tmp_path_factory.mktemp("data"), n=2)
    processor = load_processor(tiny_model_dir, max_pixels=262144)
    convs = load_datasets("my_dataset", str(data_dir), None).conversations
    samples = [encode(c, processor, 4096) for c in convs]
    assert samples[0].images[0].shape != samples[1].images[0].shape
    return Collator(processor)(samples)


def test_forward_backward_reaches_only_lora(tiny_model_dir, batch_of_two):
    torch.manual_seed(0)
    model = apply_finetuning(load_model(Path(tiny_model_dir)), FinetuneConfig(lora_rank=8), log=lambda _: None)
    out = model(**batch_of_two)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(".language_model." in n for n in with_grad)
    # lora_B starts at zero, so at step 0 only lora_B receives a non-zero gradient
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_image_positions_need_mm_token_type_ids(tiny_model_dir, batch_of_two):
    """Without mm_token_type_ids transformers silently uses 1-D positions: the collator must pass it."""
    model = load_model(Path(tiny_model_dir))
    assert "mm_token_type_ids" in batch_of_two
    assert int(batch_of_two["mm_token_type_ids"].sum()) == int((batch_of_two["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        with_types = model(**batch_of_two).logits
        without = model(**{k: v for k, v in batch_of_two.items() if k != "mm_token_type_ids"}).logits
    assert (with_types - without).abs().max() > 1e-4


def test_lora_target_list_and_freeze_and_full(tiny_model_dir):
    model = apply_finetuning(load_model(Path(tiny_model_dir)), FinetuneConfig(lora_target="q_proj,v_proj"),
                             log=lambda _: None)
    lora_modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_" in n}
    assert lora_modules == {"q_proj", "v_proj"}

    frozen = apply_finetuning(load_model(Path(tiny_model_dir)),
                              FinetuneConfig(finetuning_type="freeze", freeze_trainable_layers=1), log=lambda _: None)
    trainable = [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert trainable and all(".language_model.layers.1." in n for n in trainable)

    full = apply_finetuning(load_model(Path(tiny_model_dir)), FinetuneConfig(finetuning_type="full"),
                            log=lambda _: None)
    names = {n: p.requires_grad for n, p in full.named_parameters()}
    assert all(v for n, v in names.items() if ".language_model." in n)
    assert not any(v for n, v in names.items() if ".visual." in n)
    assert "trainable%" in parameter_summary(full)


def test_unfrozen_projector_is_trained_with_lora(tiny_model_dir):
    model = apply_finetuning(load_model(Path(tiny_model_dir)),
                             FinetuneConfig(freeze_multi_modal_projector=False), log=lambda _: None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("merger" in n for n in trainable)
    assert not any(".visual.blocks." in n for n in trainable)


def test_unknown_lora_target_is_clear(tiny_model_dir):
    from vlmtune.errors import VlmtuneError

    with pytest.raises(VlmtuneError, match="no linear module named qkv_proj"):
        apply_finetuning(load_model(Path(tiny_model_dir)), FinetuneConfig(lora_target="qkv_proj"), log=lambda _: None)
