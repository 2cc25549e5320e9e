"""Frozen vision tower: each image's features computed once, reused every epoch.

With LoRA on the language model (the default), the vision tower and projector never change, so their
output for an image is the same in epoch 1 and epoch 30. The first time a sample is trained its image
features are computed (no grad) and kept on the CPU, and its decoded pixels are dropped; afterwards the
model receives them as `mm_encoder_outputs` and skips the vision tower. Memory per image: image tokens ×
hidden size in the compute dtype (64 × 128 × 4 B = 32 KB on the tiny model, 334 × 3584 × 2 B = 2.4 MB on
Qwen2.5-VL-7B at 262,144 pixels), against 3 bytes per pixel for the kept pixels. Qwen3-VL's tower also
gives deepstack features, one more such tensor per deepstack layer (three on the releases), which the
language model adds to its first layers: they are cached with the features.
"""

from __future__ import annotations

import torch

from vlmtune.data.encode import EncodedSample
from vlmtune.data.images import image_grids
from vlmtune.model.vision import vision_encoder


class ImageFeatureCache:
    def __init__(self, model, processor, accelerator, enabled: bool):
        self.model, self.processor, self.accelerator = model, processor, accelerator
        self.enabled = enabled

    @torch.no_grad()
    def fill(self, samples: list[EncodedSample]) -> list[EncodedSample]:
        """Compute and attach features for the samples that do not have them yet."""
        if not self.enabled:
            return samples
        todo = [s for s in samples if s.image_features is None and s.images]
        if todo:
            # The resized images through `model.vision.VisionEncoder`: transformers' vision tower and
            # merger in fewer, larger ops (equal to `get_image_features` within 1e-5).
            settings = self.processor.image_processor
            images = [im for s in todo for im in s.images]
            grids = image_grids(images, settings)
            encoder = vision_encoder(_vision_owner(self.accelerator.unwrap_model(self.model)).visual)
            with self.accelerator.autocast():
                features = encoder.still_images(images, grids.to(self.accelerator.device), settings)
            features = [f.to("cpu") for f in encoder.split(features, grids)]
            del images
            # Copied once the forward's temporaries are freed, so the kept copies land in the holes they
            # left, not above them: kept tensors at the top of the heap pin everything below them (glibc
            # returns only the top), which grew the RSS by ~4 MB per cached 448² image (~200 MiB here).
            features = iter([f.clone() for f in features])
            for sample in todo:
                n = len(sample.images)
                sample.image_features = [next(features) for _ in range(n)]
                sample.image_grid_thw = grids[:n]
                grids = grids[n:]
                sample.images = []  # the pixels are not needed any more
        return samples


def _vision_owner(model):
    """The module that owns the vision tower (`.visual`, with its merger) under peft wrappers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model if hasattr(inner, "model") and hasattr(inner.model, "get_image_features") else inner


def can_cache(cfg) -> bool:
    """Only when nothing in the vision path trains."""
    ft = cfg.finetune
    return cfg.train.cache_image_features and ft.freeze_vision_tower and ft.freeze_multi_modal_projector
