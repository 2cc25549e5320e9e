import json

from transformers import AutoModelForImageTextToText, AutoTokenizer

from helpers import run_cli


def test_tiny_model_loads_like_a_real_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    result = run_cli("tiny-model", "--out", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["text_config"]["hidden_size"] == 128 and config["vision_config"]["depth"] == 2
    model = AutoModelForImageTextToText.from_pretrained(str(out))
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
