"""Qwen3.5 / 3.6 / 3.8, dense and MoE (`qwen3_5`, `qwen3_5_moe`; Qwen3.6 and Qwen3.8 load as the same types).

Natively multimodal, hybrid: three Gated-DeltaNet *linear-attention* layers (a recurrent state, a causal conv)
per gated full-attention layer; Qwen3-VL's vision tower without deepstack; images exactly as Qwen3-VL (16-px
patches merged 2 × 2, mean/std 0.5, 65,536–16,777,216 px); Qwen3-VL's interleaved 3-D rope (`get_rope_index` is
the same). What that means for vlmtune:

* The recurrent state after a right-padded prompt has run over the pads: scoring and generation pad prompts on
  the left (`recurrent_state`), where zeroed inputs keep the state at zero (exact; tests/infer/test_scoring.py).
  A training forward is exact either way (outputs at real tokens never depend on later pads).
* LoRA `all` is every Linear of the language model, LLaMA-Factory's choice: attention, the linear-attention
  projections (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, `out_proj`), the dense MLP, and on the MoE
  the shared expert and `shared_expert_gate` — not the routed experts (fused 3-D parameters) or the router.
* Every release is a thinking model. Template `qwen3_5` (`qwen3_6`, `qwen3_8`: the same rendering) with
  `enable_thinking: false` — the default here — renders as the checkpoint's own template with thinking off:
  the prompt ends `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n` and the answer + `<|im_end|>` is learned.
  With `enable_thinking: true` (LLaMA-Factory's default for a named reasoning template) the empty thought is
  part of the learned answer. `qwen3_5_nothink` renders as LLaMA-Factory does, with no thought block at all —
  not what the checkpoint's template (or vLLM serving an export) writes; a start-up line says so.
* A merged export ships the checkpoint's own template with its thinking default set to the training's
  (`served_chat_template`), so `apply_chat_template(..., add_generation_prompt=True)` asks what was learned.
* Speed kernels on GPUs: flash-linear-attention and causal-conv1d (the `[gdn]` extra); without them
  transformers runs its pure-torch path (a Python loop over 64-token chunks).
"""

from __future__ import annotations

from vlmtune.families.base import CHATML, Family, TemplateSpec, TinySpec, mrope_sections, tiny_multimodal, tiny_text
from vlmtune.families.qwen3_vl import IMAGES, THINK_TOKENS, tiny_vision

# Qwen3.5's pre-tokenizer split: Qwen2's with combining marks (\p{M}) kept with their letters; NFC first.
QWEN3_5_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

NOTHINK_NOTE = ("template qwen3_5_nothink renders no thought block (LLaMA-Factory's rendering), but the checkpoint's "
                "own chat template — and so vLLM or transformers serving the merged export — puts an empty thought "
                "(<think>\\n\\n</think>\\n\\n) before every answer when thinking is off; template qwen3_5 with "
                "enable_thinking: false trains on exactly that prompt")


def served_like(name: str) -> TemplateSpec:
    """A template rendered as the releases' chat template renders it."""
    return TemplateSpec(name, reasoning=True, trim_content=True, history_thoughts=False, prompt_opens_thought=True)


TEMPLATES = (served_like("qwen3_5"), TemplateSpec("qwen3_5_nothink", mismatch_note=NOTHINK_NOTE),
             served_like("qwen3_6"), served_like("qwen3_8"))

# The generation prompt of the releases' templates: Qwen3.5-4B and larger think unless enable_thinking is false,
# 2B and smaller the reverse (the only difference between the two files).
_OPEN = "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
THINKS_BY_DEFAULT = (_OPEN + "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
                     "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- else %}\n        {{- '<think>\\n' }}\n"
                     "    {%- endif %}\n{%- endif %}")
QUIET_BY_DEFAULT = (_OPEN + "    {%- if enable_thinking is defined and enable_thinking is true %}\n"
                    "        {{- '<think>\\n' }}\n    {%- else %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
                    "    {%- endif %}\n{%- endif %}")
NO_THOUGHT = _OPEN + "{%- endif %}"


def served_chat_template(own: str, spec: TemplateSpec, enable_thinking: bool) -> str:
    """The checkpoint's own chat template with its generation prompt set to what training rendered: thinking
    off by default (`qwen3_5` + enable_thinking false), on (+ true), or no thought block (`qwen3_5_nothink`).
    A template whose generation prompt is not one of the releases' gets the family's (Qwen3.5's) instead."""
    from vlmtune.families import chat_template_text

    wanted = NO_THOUGHT if not spec.reasoning else THINKS_BY_DEFAULT if enable_thinking else QUIET_BY_DEFAULT
    for template in (own, chat_template_text(FAMILY)):
        for block in (THINKS_BY_DEFAULT, QUIET_BY_DEFAULT):
            if template.count(block) == 1:
                return template.replace(block, wanted)
    raise AssertionError("the family's own chat template lost its generation prompt")  # tests/test_families.py


def tiny_config(tokenizer, model_type: str, sizes):
    """Linear and full attention alternating (the releases: three linear layers per full one), the last one
    full; linear attention with 2 key and 4 value heads of 32; gated full attention with partial rotary 0.25;
    the MoE with 4 experts, 2 per token, and a shared expert in every layer."""
    import transformers

    head_dim = sizes["text_hidden"] // 4
    layers = sizes["text_layers"]
    text = tiny_text(tokenizer, sizes, {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                        "mrope_interleaved": True,
                                        "mrope_section": mrope_sections(head_dim // 4, interleaved=True)},
                     head_dim=head_dim, linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32,
                     linear_num_key_heads=2, linear_num_value_heads=4,
                     layer_types=["full_attention" if (layers - 1 - i) % 2 == 0 else "linear_attention"
                                  for i in range(layers)])
    if model_type == "qwen3_5_moe":
        del text["intermediate_size"]
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=sizes["text_hidden"] // 2,
                    shared_expert_intermediate_size=sizes["text_hidden"] // 2)
        return tiny_multimodal(transformers.Qwen3_5MoeConfig, tokenizer, text, tiny_vision(sizes))
    return tiny_multimodal(transformers.Qwen3_5Config, tokenizer, text, tiny_vision(sizes))


FAMILY = Family(
    name="Qwen3.5", model_types=("qwen3_5", "qwen3_5_moe"), templates=TEMPLATES,
    thinking_template="qwen3_5", default_enable_thinking=False, image_defaults=IMAGES, chat_template="qwen3_5.jinja",
    tiny=TinySpec(config=tiny_config, split_regex=QWEN3_5_SPLIT, nfc=True, added_tokens=THINK_TOKENS),
    tokens=CHATML, recurrent_state=True, served_chat_template=served_chat_template,
    fast_vision_towers=("Qwen3_5VisionModel", "Qwen3_5MoeVisionModel"),
    fast_rope_models=("Qwen3_5Model", "Qwen3_5MoeModel"), zero3_leaf_modules=("Qwen3_5MoeSparseMoeBlock",),
    kernels=(("fla", "flash-linear-attention"), ("causal_conv1d", "causal-conv1d")),
    kernels_note=("the linear-attention layers run transformers' pure-torch path (a Python loop over 64-token "
                  "chunks; reported ≈1.7× slower fine-tuning and up to 10× slower inference on GPUs): "
                  "pip install 'vlmtune[gdn]' for flash-linear-attention and causal-conv1d"))
