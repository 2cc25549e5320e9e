"""Qwen2-VL and Qwen2.5-VL (`qwen2_vl`, `qwen2_5_vl`): 14-px patches merged 2 × 2 (one token per 28 × 28 px),
CLIP mean/std, full attention in every text layer, 3-D multimodal rope. Template `qwen2_vl`: "You are a helpful
assistant." when a conversation has no system turn. Qwen2-VL's vision tower has one MLP width and no windows;
Qwen2.5-VL's has windowed attention with a few full-attention blocks (`fullatt_block_indexes`)."""

from __future__ import annotations

from vlmtune.families.base import (CLIP_MEAN, CLIP_STD, QWEN2_SPLIT, Family, TemplateSpec, TinySpec,
                                   image_defaults, mrope_sections, tiny_multimodal, tiny_text)

QWEN2_VL = TemplateSpec("qwen2_vl", default_system="You are a helpful assistant.")
IMAGES = image_defaults(14, CLIP_MEAN, CLIP_STD, 56 * 56, 28 * 28 * 1280, "Qwen2VLImageProcessor")


def tiny_config(tokenizer, model_type: str, sizes):
    """Text hidden / layers and vision hidden / depth from `sizes`; Qwen2.5-VL's tower with windows of 112 px
    and its last block full attention."""
    import transformers

    head_dim = sizes["text_hidden"] // 4
    text = tiny_text(tokenizer, sizes, {"rope_type": "default", "rope_theta": 1000000.0,
                                        "mrope_section": mrope_sections(head_dim, interleaved=False)},
                     max_window_layers=sizes["text_layers"])
    depth, hidden = sizes["vision_depth"], sizes["vision_hidden"]
    if model_type == "qwen2_vl":  # Qwen2-VL's tower: one MLP width, no windows
        vision = dict(depth=depth, embed_dim=hidden, hidden_size=sizes["text_hidden"], mlp_ratio=2, num_heads=4,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return tiny_multimodal(transformers.Qwen2VLConfig, tokenizer, text, vision)
    vision = dict(depth=depth, hidden_size=hidden, intermediate_size=hidden * 2, num_heads=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=sizes["text_hidden"], patch_size=14, window_size=112,
                  fullatt_block_indexes=[depth - 1], tokens_per_second=2)
    return tiny_multimodal(transformers.Qwen2_5_VLConfig, tokenizer, text, vision)


TINY = TinySpec(config=tiny_config, split_regex=QWEN2_SPLIT)

QWEN2_VL_FAMILY = Family(
    name="Qwen2-VL", model_types=("qwen2_vl",), templates=(QWEN2_VL,), image_defaults=IMAGES,
    chat_template="qwen2_vl.jinja", tiny=TINY,
    fast_decoder_layers=("Qwen2VLDecoderLayer",), fast_rope_models=("Qwen2VLModel",))

QWEN2_5_VL_FAMILY = Family(
    name="Qwen2.5-VL", model_types=("qwen2_5_vl",), templates=(QWEN2_VL,), image_defaults=IMAGES,
    chat_template="qwen2_vl.jinja", tiny=TINY, template_aliases={"qwen2_5_vl": "qwen2_vl"},  # earlier vlmtune's name
    fast_vision_towers=("Qwen2_5_VisionTransformerPretrainedModel",),
    fast_decoder_layers=("Qwen2_5_VLDecoderLayer",), fast_rope_models=("Qwen2_5_VLModel",))
