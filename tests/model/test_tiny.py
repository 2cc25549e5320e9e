import json

import pytest
from transformers import AutoModelForImageTextToText, AutoTokenizer

from helpers import ALL_ARCHS, run_cli, run_inline
from vlmtune.families import TINY_DEFAULT, chat_template_text, family_of_type


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_tiny_model_loads_like_a_real_checkpoint(tmp_path, capsys, arch):
    out = tmp_path / "tiny"
    # the default family from a shell, the others in this process (the same command, without 4 s of imports)
    result = run_cli("tiny-model", "--out", str(out)) if arch == TINY_DEFAULT else \
        run_inline(capsys, "tiny-model", "--out", str(out), "--arch", arch)
    assert result.returncode == 0, result.stderr
    family = family_of_type(arch)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["text_config"]["hidden_size"] == 128 and config["vision_config"]["depth"] == 2
    model = AutoModelForImageTextToText.from_pretrained(str(out))
    assert type(model).__name__ == config["architectures"][0] and type(model).__name__.endswith(
        "ForConditionalGeneration")
    processor = json.loads((out / "preprocessor_config.json").read_text())  # the release's image settings
    assert (processor["patch_size"], processor["image_mean"]) == (family.image_defaults["patch_size"],
                                                                   family.image_defaults["image_mean"])
    assert (out / "chat_template.jinja").read_text() == chat_template_text(family)  # the family's own
    if family.deepstack_output:  # deepstack into the first text layer
        assert config["vision_config"]["deepstack_visual_indexes"] == [0]
    if family.recurrent_state:  # linear attention, and the last layer full attention
        assert config["text_config"]["layer_types"] == ["linear_attention", "full_attention"]
    text = config["text_config"]  # transformers 5 writes num_experts as num_local_experts
    if "moe" in model.config.text_config.model_type:
        assert text.get("num_experts", text.get("num_local_experts")) == 4 and model.config.text_config.num_experts == 4
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 2e6
    tok = AutoTokenizer.from_pretrained(str(out))
    for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, special
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
    assert "<|vision_start|><|image_pad|><|vision_end|>" in tok.chat_template
    # Chinese text round-trips through the byte-level BPE
    text = "判断以上图片是否满足要求:\n1. 立方体"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
