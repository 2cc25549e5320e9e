"""The family record: every question the pipeline asks about a model family, answered in one place.

A family module (`families/qwen2_vl.py`, ...) fills one `Family`; the registry (`families/__init__.py`) lists
them, one line each. Nothing outside `families/` names a model type or a transformers class: the pipeline asks
the record of the model it has (`family_of_model`, `family_of_dir`), and tests/test_families.py checks each
record against its tiny model and its released chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class SpecialTokens:
    """The chat format's special tokens (ChatML, as every Qwen family writes it) and the image tokens."""

    turn_start: str = "<|im_start|>"
    turn_end: str = "<|im_end|>"  # ends every turn; generation stops here
    end_of_text: str = "<|endoftext|>"  # the pad token, and a second stop token
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"  # one per image token
    video_pad: str = "<|video_pad|>"
    # A reasoning template's thought block (ordinary added tokens of the vocabulary, not special ones).
    thought_open: str = "<think>"
    thought_close: str = "</think>"

    @property
    def assistant_start(self) -> str:
        """What opens an assistant turn (the generation prompt of a plain template)."""
        return f"{self.turn_start}assistant\n"

    @property
    def thought_words(self) -> tuple[str, str]:
        """How a reasoning template writes a thought: `<think>\\n` … `\\n</think>\\n\\n` (the empty one, with
        nothing between, is `<think>\\n\\n</think>\\n\\n`)."""
        return f"{self.thought_open}\n", f"\n{self.thought_close}\n\n"


CHATML = SpecialTokens()


@dataclass(frozen=True)
class TemplateSpec:
    """One chat format a `template:` name renders (`data.template.Template` renders it with a run's
    enable_thinking). Names are LLaMA-Factory's."""

    name: str
    default_system: str | None = None  # the system turn of conversations without one (None: no system turn)
    reasoning: bool = False  # answers open with a thought block (the empty one when they have none)
    # The checkpoint's own template trims every message's content (Qwen3.5's `render_content(...)|trim`).
    trim_content: bool = False
    # Assistant turns before the last user turn keep their thought blocks (False: Qwen3.5 drops them).
    history_thoughts: bool = True
    # With enable_thinking, the generation prompt already opens the thought (`<|im_start|>assistant\n<think>\n`).
    prompt_opens_thought: bool = False
    # Why this rendering is not the checkpoint's own (one start-up line), and the template that is.
    mismatch_note: str | None = None


@dataclass(frozen=True)
class Layout:
    """Where the parts of a model are, as qualified module names of the transformers model (no peft or DDP
    wrapper). `owner` holds the vision tower and the language model, `get_rope_index`, `get_image_features`
    and the `rope_deltas` state."""

    owner: str = "model"
    language_model: str = "model.language_model"
    vision_tower: str = "model.visual"
    projector: str = "model.visual.merger"  # part of the tower's module tree, trained (or frozen) on its own
    lm_head: str = "lm_head"


@dataclass(frozen=True)
class Parts:
    """The modules of one loaded model at its family's `Layout`."""

    owner: Any
    language_model: Any
    vision_tower: Any
    projector: Any


@dataclass(frozen=True)
class TinySpec:
    """How `vlmtune tiny-model` builds a small random model of the family (tests and the demo)."""

    # (tokenizer, model_type, sizes: dict) → a transformers config of the real architecture, small.
    config: Callable[..., Any]
    # The tokenizer's pre-tokenizer split (the release's regex) and whether it normalises to NFC first.
    split_regex: str
    nfc: bool = False
    added_tokens: tuple[str, ...] = ()  # ordinary added tokens of the vocabulary (Qwen3's `<think>`, `</think>`)


@dataclass(frozen=True)
class Family:
    """What vlmtune needs to know about one model family (see the module docstring)."""

    name: str  # for messages: "Qwen2.5-VL"
    model_types: tuple[str, ...]  # `model_type` in config.json (dense and MoE variants alike)
    templates: tuple[TemplateSpec, ...]  # the chat formats that fit; the first is the default
    image_defaults: Mapping[str, Any]  # preprocessor_config.json values for keys a checkpoint leaves out
    chat_template: str  # asset in vlmtune/assets/chat_templates/, for models without a chat template
    tiny: TinySpec
    # The default template instead, when the checkpoint's own chat template thinks (`<think>`), and the
    # enable_thinking it takes when the run sets none (None: LLaMA-Factory's default, true).
    thinking_template: str | None = None
    default_enable_thinking: bool | None = None
    template_aliases: Mapping[str, str] = field(default_factory=dict)  # older names → template names
    tokens: SpecialTokens = CHATML
    layout: Layout = Layout()
    # Import path of the vision output class that carries deepstack features (None: the tower returns its
    # merged features only, `BaseModelOutputWithPooling`).
    deepstack_output: str | None = None
    # Positions: "mrope" — 3-D multimodal rope from the model's `get_rope_index(input_ids, mm_token_type_ids,
    # attention_mask, image_grid_thw)`, text tokens after the prompt at max(prompt positions) + 1.
    positions: str = "mrope"
    # Linear-attention (recurrent) layers: their state after a right-padded prompt is not the state at the
    # last real token, so prompts that continue from their cache are padded on the left (zeroed inputs keep
    # the state at zero). Every cache layer, recurrent or not, is repeated per label by `reorder_cache`.
    recurrent_state: bool = False
    # Fast paths, by the transformers class names each was proven equal on.
    fast_vision_towers: tuple[str, ...] = ()  # model.vision.VisionEncoder's own forward
    fast_decoder_layers: tuple[str, ...] = ()  # infer.last_positions: last layer at the kept positions only
    fast_rope_models: tuple[str, ...] = ()  # infer.rope_positions: get_rope_index in whole-batch ops
    # Mixture-of-experts blocks, by class name, that ZeRO-3 gathers as one unit (DeepSpeed's leaf modules, as
    # LLaMA-Factory marks them): a block whose experts are fetched one by one per routed token stalls every rank.
    zero3_leaf_modules: tuple[str, ...] = ()
    # The chat template a merged export ships so that serving renders what training did:
    # (the checkpoint's own template, the template spec, enable_thinking) → Jinja. None: the checkpoint's own.
    served_chat_template: Callable[[str, TemplateSpec, bool], str] | None = None
    # GPU kernels the family's layers want, and what their absence costs (one start-up line on CUDA):
    # ((import name, pip name), ...), the line.
    kernels: tuple[tuple[str, str], ...] = ()
    kernels_note: str | None = None

    @property
    def template_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.templates)

    def parts(self, core) -> Parts:
        """The owner, language model, vision tower and projector modules of a loaded model of this family
        (a transformers model, not wrapped)."""
        layout = self.layout
        return Parts(*(core.get_submodule(path) for path in
                       (layout.owner, layout.language_model, layout.vision_tower, layout.projector)))


def image_defaults(patch: int, mean, std, min_pixels: int, max_pixels: int, processor_type: str) -> dict[str, Any]:
    """transformers' class defaults of the image processor (Qwen2VLImageProcessor for every Qwen family)."""
    return {"do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(mean), "image_std": list(std), "patch_size": patch,
            "temporal_patch_size": 2, "merge_size": 2,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "image_processor_type": processor_type}


# Qwen2's pre-tokenizer split (the same regex as the releases' tokenizer.json).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def token_ids(tokenizer, tokens: SpecialTokens = CHATML) -> dict[str, int]:
    """The ids a config names: image, video, vision start/end, and the text config's bos / eos / pad."""
    def ids(token: str) -> int:
        return tokenizer.convert_tokens_to_ids(token)

    return {"image_token_id": ids(tokens.image_pad), "video_token_id": ids(tokens.video_pad),
            "vision_start_token_id": ids(tokens.vision_start), "vision_end_token_id": ids(tokens.vision_end),
            "bos_token_id": ids(tokens.end_of_text), "eos_token_id": ids(tokens.turn_end),
            "pad_token_id": ids(tokens.end_of_text)}


def vocab_size(tokenizer) -> int:
    """The embedding rows of a tiny model: the tokenizer's size rounded up to 64, as releases pad theirs."""
    return ((len(tokenizer) + 63) // 64) * 64


def mrope_sections(rotary_dim: int, interleaved: bool) -> list[int]:
    """(temporal, height, width) rotary frequency counts summing to rotary_dim / 2, shaped like Qwen's:
    [16, 24, 24] of 64 for Qwen2-VL / 2.5-VL, [24, 20, 20] of 64 for Qwen3-VL (interleaved)."""
    half = rotary_dim // 2
    if interleaved:
        side = (half * 5) // 16
        return [half - 2 * side, side, side]
    quarter = rotary_dim // 8
    return [quarter, (half - quarter) // 2, half - quarter - (half - quarter) // 2]


def tiny_text(tokenizer, sizes: Mapping[str, int], rope_parameters: dict, **extra) -> dict[str, Any]:
    """The text config every tiny model shares: 4 attention heads over 2 KV heads, MLP twice the hidden size."""
    ids = token_ids(tokenizer)
    hidden = sizes["text_hidden"]
    return dict(vocab_size=vocab_size(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=sizes["text_layers"], num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=32768, rms_norm_eps=1e-6, rope_parameters=rope_parameters,
                bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
                tie_word_embeddings=False, **extra)


def tiny_multimodal(config_class, tokenizer, text: dict, vision: dict):
    """The top-level config of a tiny model: text and vision configs and the image token ids."""
    ids = token_ids(tokenizer)
    return config_class(text_config=text, vision_config=vision, tie_word_embeddings=False,
                        **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                               "vision_end_token_id")})
