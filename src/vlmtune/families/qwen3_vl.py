"""Qwen3-VL, dense and MoE (`qwen3_vl`, `qwen3_vl_moe`): 16-px patches merged 2 × 2 (one token per 32 × 32 px),
mean/std 0.5, at least 256 × 256 px; a learned position grid resampled to each image; *deepstack*: the tower
also returns features of some of its blocks, which the language model adds to the hidden states of its first
layers at the image tokens (so precomputed image features carry them). Interleaved 3-D rope. The MoE's experts
are fused 3-D parameters (LoRA `all` is the attention projections, as in LLaMA-Factory; `lora_target_experts`
adds the experts). Templates: `qwen3_vl_nothink` (Instruct releases; no default system turn) and `qwen3_vl`
(LLaMA-Factory's reasoning template: an empty thought opens every answer without one)."""

from __future__ import annotations

from vlmtune.families.base import (QWEN2_SPLIT, Family, TemplateSpec, TinySpec, image_defaults, mrope_sections,
                                   tiny_multimodal, tiny_text)

# Qwen3-VL's release: 16-px patches (one token per 32 × 32 px), mean/std 0.5, at least 256 × 256 px.
IMAGES = image_defaults(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 65536, 16777216, "Qwen2VLImageProcessorFast")
THINK_TOKENS = ("<think>", "</think>")  # added tokens of Qwen3's vocabulary, not special ones (decoding keeps them)


def tiny_vision(sizes) -> dict:
    """Qwen3-VL's tower, small: a learned 4 × 4 position grid."""
    hidden = sizes["vision_hidden"]
    return dict(depth=sizes["vision_depth"], hidden_size=hidden, intermediate_size=hidden * 2, num_heads=4,
                spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=sizes["text_hidden"], patch_size=16,
                num_position_embeddings=16)


def tiny_config(tokenizer, model_type: str, sizes):
    """Deepstack from the first vision block (into the first text layer); the MoE with 4 experts, 2 per token,
    in every layer."""
    import transformers

    head_dim = sizes["text_hidden"] // 4
    text = tiny_text(tokenizer, sizes, {"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                        "mrope_section": mrope_sections(head_dim, interleaved=True)},
                     head_dim=head_dim)
    vision = {**tiny_vision(sizes), "deepstack_visual_indexes": [0]}
    if model_type == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=sizes["text_hidden"] // 2,
                    decoder_sparse_step=1, mlp_only_layers=[])
        return tiny_multimodal(transformers.Qwen3VLMoeConfig, tokenizer, text, vision)
    return tiny_multimodal(transformers.Qwen3VLConfig, tokenizer, text, vision)


FAMILY = Family(
    name="Qwen3-VL", model_types=("qwen3_vl", "qwen3_vl_moe"),
    templates=(TemplateSpec("qwen3_vl_nothink"), TemplateSpec("qwen3_vl", reasoning=True)),
    thinking_template="qwen3_vl", image_defaults=IMAGES, chat_template="qwen3_vl_instruct.jinja",
    tiny=TinySpec(config=tiny_config, split_regex=QWEN2_SPLIT, added_tokens=THINK_TOKENS),
    deepstack_output="transformers.models.qwen3_vl.modeling_qwen3_vl.BaseModelOutputWithDeepstackFeatures",
    fast_vision_towers=("Qwen3VLVisionModel", "Qwen3VLMoeVisionModel"),
    fast_decoder_layers=("Qwen3VLTextDecoderLayer", "Qwen3VLMoeTextDecoderLayer"),
    fast_rope_models=("Qwen3VLModel", "Qwen3VLMoeModel"), zero3_leaf_modules=("Qwen3VLMoeTextSparseMoeBlock",))
