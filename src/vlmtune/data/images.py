"""Images: size from the header (for token budgets), one decode + resize per sample, fast patchify.

A sample keeps its image as the resized uint8 tensor (3 × H × W) — a quarter of the memory of the
float patches — and the collator turns it into Qwen's flat patches with torch ops. The result is
identical to `Qwen2VLImageProcessorPil` (tests/data/test_images.py), which is 20× slower at this step.
The settings (patch size, pixel limits, mean, std) come from `data.image_settings.ImageSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageOps

from vlmtune.data.image_settings import ImageSettings

if TYPE_CHECKING:
    import torch

# torch and transformers are imported inside the functions that need them: `vlmtune data check`
# without a model reads image headers only and starts in a fraction of the time.


class ImageError(Exception):
    """An image that cannot be used (missing, unreadable)."""


# Modes Pillow gives 16-bit and 32-bit greyscale images; `convert("RGB")` clips their values at 255,
# which turns a 16-bit scan white. They are scaled to 8 bits instead.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def open_header(source) -> Image.Image:
    """A file path or binary stream opened lazily (header read, pixels not decoded), or an ImageError.

    Pillow raises many kinds of exceptions on hostile or broken files (OSError, SyntaxError, ValueError,
    struct.error, ...), so any exception here means "not a readable image". Its decompression-bomb guard
    (an image over twice Image.MAX_IMAGE_PIXELS) is named as such.
    """
    if isinstance(source, (str, Path)):
        _regular_file(source)
    try:
        return Image.open(source)
    except FileNotFoundError:
        raise ImageError("image not found") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too many pixels to decode safely ({exc})") from None
    except Exception as exc:  # noqa: BLE001 — see the docstring
        raise ImageError(f"unreadable image ({exc.__class__.__name__})") from None


# EXIF orientations that turn the picture a quarter (width and height swap as viewed).
QUARTER_TURNS = (5, 6, 7, 8)
EXIF_ORIENTATION = 0x0112


def _regular_file(path: str | Path) -> None:
    """A FIFO, device or directory named as an image would block the read forever (or fail obscurely): only
    regular files are opened (a link to one is fine)."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError("image not found") from None
    except OSError as exc:
        raise ImageError(f"unreadable image ({exc.strerror or exc.__class__.__name__})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ImageError(f"not an image file ({kind})")


def header_size(path: str | Path, decode: bool = False) -> tuple[int, int]:
    """(width, height) as viewed, from the file header; with decode, every pixel is decoded too (a truncated file
    has a good header: only decoding finds it)."""
    with open_header(path) as image:
        if decode:
            decode_rgb(image)
        return viewed_size(image)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: as stored), without decoding the pixels; an unreadable EXIF block counts as none."""
    try:
        late = png_exif_after_pixels(image)
        exif = image.getexif() if late is None else Image.Exif()
        if late:
            exif.load(late)
        value = exif.get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 — a broken EXIF block: the pixels are still an image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def png_exif_after_pixels(image: Image.Image) -> bytes | None:
    """For a PNG opened lazily with no EXIF before its pixel data: the eXIf chunk after it (b"" when there is none),
    found by walking the chunk headers. Pillow's `getexif()` decodes the whole image to look there (16 ms for a
    1-megapixel PNG against 0.05 ms for a JPEG's header): every header check would decode every PNG. None: not such
    an image (a JPEG, a loaded PNG, one with its EXIF early), `getexif()` is cheap."""
    import struct

    fp = getattr(image, "fp", None)
    if image.format != "PNG" or "exif" in image.info or getattr(image, "png", None) is None or fp is None:
        return None
    start = fp.tell()
    try:
        fp.seek(8)  # past the signature; then chunks: length, type, data, CRC
        while len(head := fp.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return fp.read(length)
            if kind == b"IEND":
                break
            fp.seek(length + 4, 1)
        return b""
    finally:
        fp.seek(start)


def viewed_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if orientation(image) in QUARTER_TURNS else (width, height)


def decode_rgb(image: Image.Image) -> Image.Image:
    """Decode a lazily opened image into 8-bit RGB as image viewers show it: turned by its EXIF orientation (a phone
    photo taken in portrait is stored sideways with orientation 6 or 8), transparent parts composited on white,
    16-bit greyscale scaled (not clipped). Every command decodes through here, so training, prediction, the API and
    the web page see the same pixels."""
    try:
        image.load()
        if orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode in WIDE_MODES:
            image = _to_8bit(image)
        if has_alpha(image):
            rgba = image if image.mode == "RGBA" else image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            del rgba  # not held while the RGB copy is made
        return image if image.mode == "RGB" else image.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 — a truncated or corrupt file fails only here, in many ways
        raise ImageError(f"unreadable image ({exc.__class__.__name__}: {exc})") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer / float) greyscale → 8-bit L, by the range its type holds. Read a band of rows at
    a time, so the working copies stay small (`decoded_bytes` counts on it)."""
    high = max((float(band.max()) for _, band in _bands(image) if band.size), default=0.0)
    if image.mode == "F":
        top = 1.0 if high <= 1.0 else 255.0  # floats in [0, 1] or [0, 255]
    elif image.mode.startswith("I;16") or high > 255:
        top = 65535.0
    else:
        top = 255.0
    out = np.empty((image.height, image.width), dtype=np.uint8)
    for first_row, band in _bands(image):
        scaled = np.clip(band.astype(np.float64) * (255.0 / top), 0, 255)
        out[first_row:first_row + band.shape[0]] = np.rint(scaled).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _bands(image: Image.Image):
    """(first row, pixels as an array) of consecutive bands of about PIXELS_PER_BAND pixels."""
    rows = max(1, PIXELS_PER_BAND // max(1, image.width))
    for first_row in range(0, image.height, rows):
        yield first_row, np.asarray(image.crop((0, first_row, image.width, min(first_row + rows, image.height))))


PIXELS_PER_BAND = 1 << 18  # ≈ 8 MB of working copies


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def decoded_bytes(image: Image.Image) -> int:
    """The most memory `decode_rgb` holds for this lazily opened image at once, read from its header: pixels ×
    bytes a pixel takes through the decode. Pillow keeps a pixel in 1 byte ("1", "L", "P"), 2 (16-bit greyscale) or
    4 (every other mode, RGB included); the decoded image stays while its copies are made — turned by its EXIF
    orientation (one more of its size), 8-bit greyscale of a wide mode (1), the RGB result (4) — or, for a transparent
    one, its RGBA copy (4, none for RGBA) with the white background and the composite (4 each; the RGB result is made
    once the background is freed). That is 4 bytes a pixel for RGB, 5 for 8-bit greyscale or palette, 7 for 16-bit
    greyscale, 9 for 32-bit, 12 for RGBA and up to 16 for other transparent modes (tests/data/test_images.py
    measures each). The one rule every server applies before decoding an image (with its pixel count)."""
    stored = 1 if image.mode in ("1", "L", "P") else 2 if image.mode.startswith("I;16") else 4
    turned = orientation(image) != 1
    per_pixel = stored * (2 if turned else 1)
    if image.mode in WIDE_MODES:
        per_pixel += 1
    if has_alpha(image):
        per_pixel += (0 if image.mode == "RGBA" else 4) + 8
    elif image.mode != "RGB":
        per_pixel += 4
    return image.width * image.height * per_pixel


def resized_size(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """(height, width) after Qwen's smart resize with these pixel limits."""
    try:
        return settings.resized_size(height, width)
    except ValueError as exc:  # extreme aspect ratio
        raise ImageError(str(exc)) from None


def token_count(width: int, height: int, settings: ImageSettings) -> int:
    """Image tokens the language model sees for an image of this size (before resizing)."""
    return resized_token_count(*resized_size(width, height, settings), settings)


def resized_token_count(height: int, width: int, settings: ImageSettings) -> int:
    """The token-count rule, in one place: a resized image (sides multiples of `factor`, patch × merge) is one
    language-model token per factor × factor pixels (a merged group of merge² patches)."""
    return (height // settings.factor) * (width // settings.factor)


def sequence_tokens(text_tokens: int, image_tokens: Sequence[int]) -> int:
    """Tokens of a sample whose text was tokenised with ONE image pad per image (`data.encode.tokenize_rendered`):
    each pad stands for its image's tokens."""
    return text_tokens - len(image_tokens) + sum(image_tokens)


def load_resized(path: str | Path, settings: ImageSettings) -> "torch.Tensor":
    """Decode an image once, convert to RGB and resize it exactly as the processor does (uint8 CHW)."""
    with open_header(path) as image:
        rgb = decode_rgb(image)  # decoded while the file is open; the pixels stay when it closes
    return resize_decoded(rgb, settings)


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
