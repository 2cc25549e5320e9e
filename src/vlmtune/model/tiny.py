"""`vlmtune tiny-model --out DIR`: a tiny random Qwen2.5-VL that loads like a real checkpoint.

No weights can be downloaded on the machines that test vlmtune, so tests and the demo build a model
of the real architecture with small sizes (text hidden 128, 2 layers; vision depth 2, hidden 64;
about 1 M parameters) and a byte-level BPE tokenizer trained here, in a second, on Chinese and
English text, with Qwen's special tokens and Qwen2-VL's chat template. The ordinary loading code
(`AutoModelForImageTextToText`, `AutoTokenizer`) opens the directory like any Qwen2.5-VL.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from vlmtune.data.template import QWEN2_VL_CHAT_TEMPLATE
from vlmtune.errors import VlmtuneError

# Qwen2's special tokens, in Qwen's order (the real ids start at 151643).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer split (the same regex as the real tokenizer.json).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_ZH_WORDS = ("判断 以上 图片 是否 满足 要求 不 满足要求 不满足要求 请 只 输出 如下 格式 或 画面 中 只 允许 出现 "
             "立方体 圆柱体 圆环 五角星 徽章 灯 物体 数量 必须 位于 内 外 前方 后方 左上角 右上角 左下角 右下角 "
             "水印 标注 正确 等于 之和 之积 每个 所有 一个 没有 其他 种类 位置 合格 不合格 商品 陈列 合规 检查 "
             "助手 你 是 一 二 三 四 五 六 七 的 和 与 在 有 为 个 规则 场景 描述 红色 蓝色 绿色 黄色 地面 ")
_EN_WORDS = ("you are a helpful assistant the image shows cube cylinder ring star lamp front back left right "
             "top bottom count sum product rule rules yes no compliant not with of and in on is are "
             "picture scene object objects watermark number position badge inside outside").split()


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    """Synthetic training text for the tokenizer: the task's Chinese vocabulary, English, digits."""
    rng = random.Random(seed)
    zh = _ZH_WORDS.split()
    out = []
    for _ in range(lines):
        if rng.random() < 0.6:
            out.append("".join(rng.choice(zh) for _ in range(rng.randint(3, 12))) + rng.choice("。，:：\n"))
        else:
            out.append(" ".join(rng.choice(_EN_WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".,:\n"))
        out.append(f"{rng.randint(0, 99)}. {rng.choice(zh)}{rng.choice(zh)} = {rng.randint(0, 20)}")
    out.append('请只输出如下格式:"满足要求", 或 "不满足要求"。')
    return out


def build_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer shaped like Qwen2's, trained on `corpus()`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=QWEN2_VL_CHAT_TEMPLATE,
        model_max_length=32768, clean_up_tokenization_spaces=False,
    )


def tiny_config(tokenizer, text_hidden: int = 128, text_layers: int = 2, vision_hidden: int = 64,
                vision_depth: int = 2):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    heads = 4
    head_dim = text_hidden // heads
    # mrope sections (temporal, height, width) split head_dim/2 rotary frequencies like Qwen's [16, 24, 24].
    quarter = head_dim // 8
    mrope = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=text_hidden, intermediate_size=text_hidden * 2,
            num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=32768, rms_norm_eps=1e-6, max_window_layers=text_layers,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=4,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[vision_depth - 1], out_hidden_size=text_hidden, tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_model(out: str | Path, seed: int = 0, text_hidden: int = 128, text_layers: int = 2,
                     vision_hidden: int = 64, vision_depth: int = 2, max_pixels: int = 448 * 448) -> Path:
    """Write a tiny random Qwen2.5-VL (config, safetensors, tokenizer, preprocessor) into `out`."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, text_hidden, text_layers, vision_hidden, vision_depth)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(max_pixels=max_pixels, min_pixels=28 * 28).save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}), encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text_hidden", type=int, default=128)
    parser.add_argument("--text_layers", type=int, default=2)
    parser.add_argument("--vision_hidden", type=int, default=64)
    parser.add_argument("--vision_depth", type=int, default=2)
    args = parser.parse_args(argv)
    if args.text_hidden % 32:
        raise VlmtuneError("--text_hidden must be a multiple of 32")
    out = build_tiny_model(args.out, args.seed, args.text_hidden, args.text_layers, args.vision_hidden,
                           args.vision_depth)
    n_files = len(list(out.iterdir()))
    print(f"tiny Qwen2.5-VL written to {out} ({n_files} files)")
    return 0
