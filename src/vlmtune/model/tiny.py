"""`vlmtune tiny-model --out DIR [--arch qwen2_5_vl|qwen2_vl|qwen3_vl|qwen3_vl_moe]`: a tiny random model
that loads like a real checkpoint of its family.

No weights can be downloaded on the machines that test vlmtune, so tests and the demo build a model
of the real architecture with small sizes (text hidden 128, 2 layers; vision depth 2, hidden 64;
about 1 M parameters) and a byte-level BPE tokenizer trained here, in a second, on Chinese and
English text, with Qwen's special tokens and the family's own chat template (Qwen2-VL's, or
Qwen3-VL Instruct's). The ordinary loading code (`AutoModelForImageTextToText`, `AutoTokenizer`)
opens the directory like any release of that family.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Sequence

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


def build_tokenizer(vocab_size: int = 1000, chat_template: str | None = None, extra_tokens: Sequence[str] = ()):
    """A byte-level BPE tokenizer shaped like Qwen2's, trained on `corpus()`; `extra_tokens` are added as
    ordinary (not special) tokens, as Qwen3 adds `<think>`."""
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
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    if chat_template is None:
        from vlmtune.families import FAMILIES, chat_template_text

        chat_template = chat_template_text(FAMILIES[0])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=chat_template,
        model_max_length=32768, clean_up_tokenization_spaces=False,
    )


# `--arch`: the config.json model types `tiny_config` builds (all of `vlmtune.families`).
ARCHS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe")
# Qwen3's thought delimiters: added tokens of its vocabulary, not special ones (decoding keeps them).
THINK_TOKENS = ["<think>", "</think>"]


def mrope_sections(head_dim: int, interleaved: bool) -> list[int]:
    """(temporal, height, width) rotary frequency counts summing to head_dim / 2, shaped like Qwen's:
    [16, 24, 24] of 64 for Qwen2-VL / 2.5-VL, [24, 20, 20] of 64 for Qwen3-VL (interleaved)."""
    half = head_dim // 2
    if interleaved:
        side = (half * 5) // 16
        return [half - 2 * side, side, side]
    quarter = head_dim // 8
    return [quarter, (half - quarter) // 2, half - quarter - (half - quarter) // 2]


def tiny_config(tokenizer, arch: str = "qwen2_5_vl", text_hidden: int = 128, text_layers: int = 2,
                vision_hidden: int = 64, vision_depth: int = 2):
    """A tiny config of the family's real architecture: 4 attention heads over 2 KV heads, 2 × 2 patch
    merge; Qwen3-VL with deepstack from the first vision block (into the first text layer) and a learned
    4 × 4 position grid; its MoE with 4 experts, 2 per token, in every layer."""
    import transformers

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    heads = 4
    head_dim = text_hidden // heads
    qwen3 = arch.startswith("qwen3")
    text = dict(
        vocab_size=vocab, hidden_size=text_hidden, intermediate_size=text_hidden * 2, num_hidden_layers=text_layers,
        num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0 if qwen3 else 1000000.0,
                         "mrope_section": mrope_sections(head_dim, interleaved=qwen3),
                         **({"mrope_interleaved": True} if qwen3 else {})},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text_hidden)
    if qwen3:
        text["head_dim"] = head_dim
        vision.update(patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0])
        if arch == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text_hidden // 2,
                        decoder_sparse_step=1, mlp_only_layers=[])
    else:
        text["max_window_layers"] = text_layers
        vision.update(patch_size=14, window_size=112, fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2)
        if arch == "qwen2_vl":  # Qwen2-VL's tower: one MLP width, no windows
            vision = dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=text_hidden, mlp_ratio=2,
                          num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config_class = {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen2_vl": transformers.Qwen2VLConfig,
                    "qwen3_vl": transformers.Qwen3VLConfig, "qwen3_vl_moe": transformers.Qwen3VLMoeConfig}[arch]
    return config_class(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def build_tiny_model(out: str | Path, seed: int = 0, text_hidden: int = 128, text_layers: int = 2,
                     vision_hidden: int = 64, vision_depth: int = 2, max_pixels: int = 448 * 448,
                     arch: str = "qwen2_5_vl") -> Path:
    """Write a tiny random model of `arch` (config, safetensors, tokenizer, preprocessor, chat template)."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmtune.families import chat_template_text, family_of_type

    if arch not in ARCHS:
        raise VlmtuneError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    family = family_of_type(arch)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chat_template = chat_template_text(family)
    tokenizer = build_tokenizer(chat_template=chat_template, extra_tokens=THINK_TOKENS if arch.startswith("qwen3")
                                else ())
    config = tiny_config(tokenizer, arch, text_hidden, text_layers, vision_hidden, vision_depth)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image = family.image_defaults
    factor = image["patch_size"] * image["merge_size"]
    Qwen2VLImageProcessorPil(max_pixels=max_pixels, min_pixels=factor * factor, patch_size=image["patch_size"],
                             merge_size=image["merge_size"], image_mean=image["image_mean"],
                             image_std=image["image_std"]).save_pretrained(out)
    # As the releases ship it: the processor's template (AutoTokenizer of transformers 5 reads the .jinja).
    (out / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}), encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the model into")
    parser.add_argument("--arch", default="qwen2_5_vl", choices=ARCHS, help="the family's model_type (default qwen2_5_vl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text_hidden", type=int, default=128)
    parser.add_argument("--text_layers", type=int, default=2)
    parser.add_argument("--vision_hidden", type=int, default=64)
    parser.add_argument("--vision_depth", type=int, default=2)
    args = parser.parse_args(argv)
    if args.text_hidden % 32:
        raise VlmtuneError("--text_hidden must be a multiple of 32")
    out = build_tiny_model(args.out, args.seed, args.text_hidden, args.text_layers, args.vision_hidden,
                           args.vision_depth, arch=args.arch)
    from vlmtune.families import family_of_type

    n_files = len(list(out.iterdir()))
    print(f"tiny {family_of_type(args.arch).name} written to {out} ({n_files} files)")
    return 0
