"""A tiny random model that loads like a real checkpoint of its family (any model type of `vlmtune.families`,
default qwen2_5_vl): what `vlmtune tiny-model` writes.

No weights can be downloaded on the machines that test vlmtune, so tests and the demo build a model
of the real architecture with small sizes (text hidden 128, 2 layers; vision depth 2, hidden 64;
about 1 M parameters; the family's record says how: `Family.tiny`) and a byte-level BPE tokenizer
trained here, in a second, on Chinese and English text, with the family's special tokens and its own
chat template. The ordinary loading code (`AutoModelForImageTextToText`, `AutoTokenizer`) opens the
directory like any release of that family.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.families import MODEL_TYPES, TINY_DEFAULT, Family, family_of_type

# `--arch`: the config.json model types a tiny model can be built of (every family's, `vlmtune.families`); the
# default is the demo's and the seed user's family.
ARCHS = MODEL_TYPES
DEFAULT_ARCH = TINY_DEFAULT

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


def build_tokenizer(family: Family | None = None, vocab_size: int = 1000, chat_template: str | None = None):
    """A byte-level BPE tokenizer shaped like the family's release (its pre-tokenizer split, NFC where the release
    normalises), trained on `corpus()`, with the family's special tokens in the release's order and its added
    (not special) tokens, as Qwen3 adds `<think>`. Default: the first family's, with its chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vlmtune.families import FAMILIES, chat_template_text

    family = family or FAMILIES[0]
    tokens = family.tokens
    special = [tokens.end_of_text, tokens.turn_start, tokens.turn_end, "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", tokens.vision_start,
               tokens.vision_end, "<|vision_pad|>", tokens.image_pad, tokens.video_pad]
    tok = Tokenizer(models.BPE())
    if family.tiny.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(family.tiny.split_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(special)
    if family.tiny.added_tokens:
        tok.add_tokens(list(family.tiny.added_tokens))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=tokens.turn_end, pad_token=tokens.end_of_text,
        additional_special_tokens=special[1:], chat_template=chat_template or chat_template_text(family),
        model_max_length=32768, clean_up_tokenization_spaces=False,
    )


def tiny_config(tokenizer, arch: str = DEFAULT_ARCH, text_hidden: int = 128, text_layers: int = 2,
                vision_hidden: int = 64, vision_depth: int = 2):
    """A tiny config of the family's real architecture (`Family.tiny`): 4 attention heads over 2 KV heads, 2 × 2
    patch merge, the family's own features (deepstack, linear attention, experts) at small sizes."""
    sizes = dict(text_hidden=text_hidden, text_layers=text_layers, vision_hidden=vision_hidden,
                 vision_depth=vision_depth)
    return family_of_type(arch).tiny.config(tokenizer, arch, sizes)


def build_tiny_model(out: str | Path, seed: int = 0, text_hidden: int = 128, text_layers: int = 2,
                     vision_hidden: int = 64, vision_depth: int = 2, max_pixels: int = 448 * 448,
                     arch: str = DEFAULT_ARCH) -> Path:
    """Write a tiny random model of `arch` (config, safetensors, tokenizer, preprocessor, chat template)."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from vlmtune.data.image_settings import ImageSettings
    from vlmtune.families import chat_template_text

    if arch not in ARCHS:
        raise VlmtuneError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    family = family_of_type(arch)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chat_template = chat_template_text(family)
    tokenizer = build_tokenizer(family, chat_template=chat_template)
    config = tiny_config(tokenizer, arch, text_hidden, text_layers, vision_hidden, vision_depth)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    tokens = family.tokens
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(tokens.turn_end),
                      tokenizer.convert_tokens_to_ids(tokens.end_of_text)],
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    factor = family.image_defaults["patch_size"] * family.image_defaults["merge_size"]
    ImageSettings.from_pretrained(out, max_pixels, factor * factor, defaults=family.image_defaults).save_pretrained(out)
    # As the releases ship it: the processor's template (AutoTokenizer of transformers 5 reads the .jinja).
    (out / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}), encoding="utf-8")
    return out
