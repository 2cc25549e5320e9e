"""The model families vlmtune supports, and everything that differs between them, in one record each.

The pipeline (data encoding, training, scoring, generation, serving, export) is written once, against
transformers' own model classes; what it must know about a family is here:

* which `config.json` model types belong to it, and which chat templates (`template:` names, as in
  LLaMA-Factory) render its chat format — another family's template is refused, not silently used;
* the image processor's defaults for keys a checkpoint's `preprocessor_config.json` leaves out
  (Qwen2-VL: 14-px patches, CLIP mean/std; Qwen3-VL: 16-px patches, mean/std 0.5);
* the chat template written into models that have none (the tiny test models);
* how the vision tower's output reaches the language model: Qwen3-VL's tower also returns
  *deepstack* features, added to the first decoder layers' hidden states, so precomputed image
  features (training's feature cache, scoring, generation, the servers) must carry them;
* which of vlmtune's fast paths have been proven equal to transformers' own code on it, by the class
  names they were proven on (tests/infer/test_vision.py, test_last_positions.py, test_rope_positions.py).
  A class not listed takes transformers' path; the fast paths also check themselves at run time.

A new family (Qwen3.5-VL, InternVL) is one entry here plus its tiny config (`model.tiny`) and the tests
parametrised over `FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vlmtune.errors import VlmtuneError
from vlmtune.files import read_json_object

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Family:
    """What vlmtune needs to know about one model family (see the module docstring)."""

    name: str  # for messages: "Qwen2.5-VL"
    model_types: tuple[str, ...]  # `model_type` in config.json
    templates: tuple[str, ...]  # template names that fit; the first is the default
    thinking_template: str | None  # the default instead when the checkpoint's own chat template thinks (<think>)
    image_defaults: Mapping[str, Any]  # preprocessor_config.json values for keys a checkpoint leaves out
    chat_template: str  # asset in vlmtune/assets/chat_templates/, for models without a chat template
    # Import path of the vision output class that carries deepstack features (None: the tower returns
    # its merged features only, `BaseModelOutputWithPooling`).
    deepstack_output: str | None = None
    # Fast paths, by the transformers class names each was proven equal on.
    fast_vision_towers: tuple[str, ...] = ()  # model.vision.VisionEncoder's own forward
    fast_decoder_layers: tuple[str, ...] = ()  # infer.last_positions: last layer at the kept positions only
    fast_rope_models: tuple[str, ...] = ()  # infer.rope_positions: get_rope_index in whole-batch ops


def _image_defaults(patch: int, mean, std, min_pixels: int, max_pixels: int, processor_type: str) -> dict[str, Any]:
    """transformers' class defaults of the image processor (Qwen2VLImageProcessor for all of these)."""
    return {"do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(mean), "image_std": list(std), "patch_size": patch,
            "temporal_patch_size": 2, "merge_size": 2,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "image_processor_type": processor_type}


QWEN2_IMAGES = _image_defaults(14, CLIP_MEAN, CLIP_STD, 56 * 56, 28 * 28 * 1280, "Qwen2VLImageProcessor")
# Qwen3-VL's release: 16-px patches (one token per 32 × 32 px), mean/std 0.5, at least 256 × 256 px.
QWEN3_IMAGES = _image_defaults(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 65536, 16777216, "Qwen2VLImageProcessorFast")

FAMILIES: tuple[Family, ...] = (
    Family(
        name="Qwen2-VL", model_types=("qwen2_vl",), templates=("qwen2_vl",), thinking_template=None,
        image_defaults=QWEN2_IMAGES, chat_template="qwen2_vl.jinja",
        fast_decoder_layers=("Qwen2VLDecoderLayer",), fast_rope_models=("Qwen2VLModel",)),
    Family(
        name="Qwen2.5-VL", model_types=("qwen2_5_vl",), templates=("qwen2_vl",), thinking_template=None,
        image_defaults=QWEN2_IMAGES, chat_template="qwen2_vl.jinja",
        fast_vision_towers=("Qwen2_5_VisionTransformerPretrainedModel",),
        fast_decoder_layers=("Qwen2_5_VLDecoderLayer",), fast_rope_models=("Qwen2_5_VLModel",)),
    Family(
        name="Qwen3-VL", model_types=("qwen3_vl",), templates=("qwen3_vl_nothink", "qwen3_vl"),
        thinking_template="qwen3_vl", image_defaults=QWEN3_IMAGES, chat_template="qwen3_vl_instruct.jinja",
        deepstack_output="transformers.models.qwen3_vl.modeling_qwen3_vl.BaseModelOutputWithDeepstackFeatures",
        fast_vision_towers=("Qwen3VLVisionModel",), fast_decoder_layers=("Qwen3VLTextDecoderLayer",),
        fast_rope_models=("Qwen3VLModel",)),
    Family(
        name="Qwen3-VL-MoE", model_types=("qwen3_vl_moe",), templates=("qwen3_vl_nothink", "qwen3_vl"),
        thinking_template="qwen3_vl", image_defaults=QWEN3_IMAGES, chat_template="qwen3_vl_instruct.jinja",
        deepstack_output=("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe."
                          "BaseModelOutputWithDeepstackFeatures"),
        fast_vision_towers=("Qwen3VLMoeVisionModel",), fast_decoder_layers=("Qwen3VLMoeTextDecoderLayer",),
        fast_rope_models=("Qwen3VLMoeModel",)),
)
MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)
ASSETS = Path(__file__).resolve().parent / "assets" / "chat_templates"


def family_of_type(model_type: str | None, where: str = "config.json") -> Family:
    """The family of a `model_type`, or a one-line error naming the supported ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise VlmtuneError(f"{where}: model_type '{model_type}' is not supported "
                       f"(supported: {', '.join(MODEL_TYPES)})")


def family_of_dir(model_dir: str | Path) -> Family:
    """The family of a model directory, from its config.json read as JSON (no transformers import)."""
    path = Path(model_dir) / "config.json"
    return family_of_type(read_json_object(path).get("model_type"), str(path))


def family_of_model(model) -> Family | None:
    """The family of a loaded transformers model (under peft too), None for an unknown one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def chat_template_text(family: Family) -> str:
    """The family's own chat template (Jinja), as its instruct releases ship it."""
    return (ASSETS / family.chat_template).read_text(encoding="utf-8")


def import_object(path: str):
    """`package.module.Name` → the object."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
