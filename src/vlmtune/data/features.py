"""What a vision tower hands the language model, as values the batch can carry: `ImageFeatures` per image, and
`encoder_outputs`, which packs them into the `mm_encoder_outputs` a model's forward takes. Here, below the model
code, because the collator (`data.encode`) builds batches from cached features (frozen-vision training) and the
tower (`model.vision`) produces them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmtune.families import Family, import_object


@dataclass
class ImageFeatures:
    """Vision-tower output for one image (or several, concatenated): what the language model receives."""

    embeds: torch.Tensor  # (tokens, text hidden): put at the image tokens (`pooler_output`)
    deepstack: tuple[torch.Tensor, ...] = ()  # Qwen3-VL: one (tokens, text hidden) per deepstack layer

    def to(self, *args, **kwargs) -> "ImageFeatures":
        return ImageFeatures(self.embeds.to(*args, **kwargs), tuple(d.to(*args, **kwargs) for d in self.deepstack))

    def clone(self) -> "ImageFeatures":
        return ImageFeatures(self.embeds.clone(), tuple(d.clone() for d in self.deepstack))


def encoder_outputs(features: list[ImageFeatures], family: Family | None) -> dict:
    """`mm_encoder_outputs` for a model's forward: the per-image features in the output class its vision
    tower returns (with `deepstack_features` for a deepstack family, whose forward reads them)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    embeds = [f.embeds for f in features]
    if family is None or family.deepstack_output is None:
        return {"image": BaseModelOutputWithPooling(pooler_output=embeds)}
    layers = len(features[0].deepstack) if features else 0
    if any(len(f.deepstack) != layers for f in features):
        raise ValueError("image features with and without deepstack features in one batch")
    deepstack = [[f.deepstack[k] for f in features] for k in range(layers)]
    return {"image": import_object(family.deepstack_output)(pooler_output=embeds, deepstack_features=deepstack)}
