"""Images: size from the header (for token budgets), one decode + resize per sample, fast patchify.

A sample keeps its image as the resized uint8 tensor (3 × H × W) — a quarter of the memory of the
float patches — and the collator turns it into Qwen's flat patches with torch ops. The result is
identical to `Qwen2VLImageProcessorPil` (tests/data/test_images.py), which is 20× slower at this step.
The settings (patch size, pixel limits, mean, std) come from `data.image_settings.ImageSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlmtune.data.image_settings import ImageSettings

if TYPE_CHECKING:
    import torch

# torch and transformers are imported inside the functions that need them: `vlmtune data check`
# without a model reads image headers only and starts in a fraction of the time.


class ImageError(Exception):
    """An image that cannot be used (missing, unreadable)."""


def header_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise ImageError("image not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"unreadable image ({exc.__class__.__name__})") from None


def resized_size(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """(height, width) after Qwen's smart resize with these pixel limits."""
    try:
        return settings.resized_size(height, width)
    except ValueError as exc:  # extreme aspect ratio
        raise ImageError(str(exc)) from None


def token_count(width: int, height: int, settings: ImageSettings) -> int:
    """Image tokens the language model sees for an image of this size."""
    h, w = resized_size(width, height, settings)
    return (h // settings.factor) * (w // settings.factor)


def load_resized(path: str | Path, settings: ImageSettings) -> "torch.Tensor":
    """Decode an image once, convert to RGB and resize it exactly as the processor does (uint8 CHW)."""
    try:
        with Image.open(path) as image:
            image.load()  # decode while the file is open; the pixels stay when it closes
            if image.mode != "RGB":
                image = image.convert("RGB")
    except FileNotFoundError:
        raise ImageError("image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"unreadable image ({exc.__class__.__name__}: {exc})") from None
    return resize_decoded(image, settings)


def resize_decoded(image: Image.Image, settings: ImageSettings) -> "torch.Tensor":
    """A decoded RGB PIL image → resized uint8 CHW tensor.

    transformers' PIL backend turns its array back into a PIL image, resizes it with PIL and converts
    again; resizing the decoded PIL image directly gives the same bytes without the two conversions,
    and an image already at its target size (PIL's resize is then a copy) is not resized.
    """
    import torch

    height, width = resized_size(image.width, image.height, settings)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=settings.resample)
    # A contiguous CHW copy, not a channels-last view of PIL's bytes: the vision tower's strided conv
    # runs ≈4× slower on that layout (1.5 → 6 ms per 448² image), more than this copy costs.
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())


def to_patches(images: list["torch.Tensor"], settings: ImageSettings) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Resized uint8 images → (pixel_values [patches, C·T·P·P], image_grid_thw [n, 3]).

    Same arithmetic and layout as Qwen2VLImageProcessorPil: rescale, normalise, then split into
    merge-ordered patches with the single frame repeated over the temporal patch.
    """
    import torch

    ip = settings
    patch, merge, temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    if not images:
        return torch.zeros(0, 3 * temporal * patch * patch), torch.zeros(0, 3, dtype=torch.long)
    channels = images[0].shape[0]
    grids = image_grids(images, settings)
    counts = grids.prod(-1).tolist()
    # The patches are cut from the uint8 images (a quarter of the bytes of float32) into one array, by
    # numpy (its strided copy of the 14-byte runs is about twice torch's here), then converted and
    # normalised in whole-batch passes.
    cut = np.empty((sum(counts), channels, patch * patch), dtype=np.uint8)
    row = 0
    for image, (_, gh, gw), n in zip(images, grids.tolist(), counts):
        x = image.numpy().reshape(channels, gh // merge, merge, patch, gw // merge, merge, patch)
        cut[row:row + n].reshape(gh // merge, gw // merge, merge, merge, channels, patch, patch)[...] = \
            x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P): Qwen's merge order
        row += n
    first = torch.from_numpy(cut).float()  # one frame per patch
    if ip.do_rescale:
        first.mul_(ip.rescale_factor)
    if ip.do_normalize:
        mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, -1, 1)
        std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, -1, 1)
        first.sub_(mean).div_(std)
    out = first.unsqueeze(2).expand(-1, -1, temporal, -1)
    return out.reshape(out.shape[0], -1), grids


def image_grids(images: list["torch.Tensor"], settings: ImageSettings) -> "torch.Tensor":
    """`image_grid_thw` ([n, 3]: frames, patch rows, patch columns) of resized still images."""
    import torch

    patch = settings.patch_size
    grids = [[1, image.shape[1] // patch, image.shape[2] // patch] for image in images]
    return torch.tensor(grids, dtype=torch.long).view(-1, 3)


def pixel_affine(settings: ImageSettings) -> "torch.Tensor":
    """(2, C): per channel the scale and shift that turn raw pixel values into normalised ones.

    normalised = raw · scale + shift, i.e. (raw · rescale − mean) / std, as `to_patches` computes it.
    """
    import torch

    channels = len(settings.image_mean)
    scale = torch.full((channels,), settings.rescale_factor if settings.do_rescale else 1.0, dtype=torch.float64)
    shift = torch.zeros(channels, dtype=torch.float64)
    if settings.do_normalize:
        mean = torch.tensor(settings.image_mean, dtype=torch.float64)
        std = torch.tensor(settings.image_std, dtype=torch.float64)
        scale, shift = scale / std, -mean / std
    return torch.stack([scale, shift]).float()
