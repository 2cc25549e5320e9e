"""Qwen2-VL image settings (`preprocessor_config.json`) without importing transformers' image processor.

vlmtune resizes and cuts patches itself (`data.images`); from the image processor it needs only the
numbers: patch, merge and temporal patch size, pixel limits, rescale factor, mean and std, resample
filter. Importing `Qwen2VLImageProcessorPil` costs ≈2.5 s on these machines, because transformers'
`image_processing_utils` pulls in `modeling_utils`, `torch.distributed.tensor`, sympy and
`torch._dynamo`; that import sat on the critical path of every command before the first batch. Read
as plain JSON, the same settings load in milliseconds and the model's modelling code is imported
once, by the model loader (in training, in a thread beside data encoding).

The file is read and written in transformers' format: every key of the original file is kept as it
was, pixel limits are written as `size: {shortest_edge, longest_edge}` (transformers 5) and the
legacy `min_pixels` / `max_pixels` keys (earlier releases, LLaMA-Factory, vLLM), so a saved adapter
directory loads in `AutoImageProcessor` with the same values (tests/data/test_image_settings.py
checks both directions against `Qwen2VLImageProcessorPil`).

A model directory is read where transformers 5 reads it: the `image_processor` entry of `processor_config.json`
(all that transformers 5's `processor.save_pretrained` writes) before `preprocessor_config.json`. The patch, merge
and temporal patch sizes the file leaves out come from the vision tower's own `config.json` (`vision_config`:
`patch_size`, `spatial_merge_size`, `temporal_patch_size`) before the family's defaults, and a file that disagrees
with the tower is refused in one line: its patches would not fit the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError
from vlmtune.families import FAMILIES

CONFIG_NAME = "preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"  # transformers 5's processor file: settings under `image_processor`
# Settings the vision tower fixes → their names in config.json's `vision_config`.
TOWER_KEYS = {"patch_size": "patch_size", "merge_size": "spatial_merge_size",
              "temporal_patch_size": "temporal_patch_size"}
# The first family's image processor defaults (transformers' class attributes); a model family's own
# defaults (`vlmtune.families`) take their place for that family's checkpoints.
DEFAULTS: dict[str, Any] = dict(FAMILIES[0].image_defaults)


@dataclass
class ImageSettings:
    """What vlmtune reads from a Qwen2-VL `preprocessor_config.json` (attribute names as transformers')."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    # The file as read (unknown keys included) over the family's defaults, so that saving writes back what came in.
    raw: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS), repr=False)

    @property
    def size(self) -> dict[str, int]:
        """Pixel limits in transformers 5's form."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    @property
    def factor(self) -> int:
        """Image sides are multiples of this: one merged token covers factor × factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, config: dict[str, Any], max_pixels: int | None = None, min_pixels: int | None = None,
                  defaults: dict[str, Any] | None = None) -> "ImageSettings":
        """Settings from a config dict; `max_pixels` / `min_pixels` given here win over the file.

        Precedence as in transformers: explicit arguments, then the legacy `min_pixels` /
        `max_pixels` keys, then `size`, then the defaults (the model family's; Qwen2-VL's when None).
        """
        defaults = DEFAULTS if defaults is None else defaults
        size = dict(config.get("size") or defaults["size"])
        lower = min_pixels if min_pixels is not None else config.get("min_pixels", size.get("shortest_edge"))
        upper = max_pixels if max_pixels is not None else config.get("max_pixels", size.get("longest_edge"))
        value = {**defaults, **config}.__getitem__
        return cls(patch_size=int(value("patch_size")), merge_size=int(value("merge_size")),
                   temporal_patch_size=int(value("temporal_patch_size")),
                   min_pixels=int(lower), max_pixels=int(upper), do_rescale=bool(value("do_rescale")),
                   rescale_factor=float(value("rescale_factor")), do_normalize=bool(value("do_normalize")),
                   image_mean=tuple(float(x) for x in value("image_mean")),
                   image_std=tuple(float(x) for x in value("image_std")), resample=int(value("resample")),
                   raw={**defaults, **config})

    @classmethod
    def from_pretrained(cls, directory: str | Path, max_pixels: int | None = None, min_pixels: int | None = None,
                        defaults: dict[str, Any] | None = None) -> "ImageSettings":
        """Settings of a model or adapter directory (see the module docstring for which file, and what fills the
        keys it leaves out; the defaults alone when it has no settings file)."""
        directory = Path(directory)
        tower = tower_settings(directory)
        defaults = {**(DEFAULTS if defaults is None else defaults), **tower}
        path, config = settings_file(directory)
        try:
            settings = cls.from_dict(config, max_pixels, min_pixels, defaults)
        except (ValueError, TypeError, KeyError) as exc:
            raise VlmtuneError(f"{path}: not a usable image processor config ({exc})") from None
        for key in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            if getattr(settings, key) < 1:  # 0 divides by zero when an image is resized; below 0 is no size at all
                raise VlmtuneError(f"{path}: {key} must be a positive whole number, got {getattr(settings, key)}")
        for key, value in tower.items():
            if getattr(settings, key) != value:
                raise VlmtuneError(f"{path}: {key} {getattr(settings, key)} does not fit the vision tower "
                                   f"({directory / 'config.json'}: vision_config.{TOWER_KEYS[key]} {value})")
        return settings

    def to_dict(self) -> dict[str, Any]:
        """The config as saved: the file's own keys, with these settings' values written over them."""
        out = dict(self.raw)
        out.update(patch_size=self.patch_size, merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size,
                   do_rescale=self.do_rescale, rescale_factor=self.rescale_factor, do_normalize=self.do_normalize,
                   image_mean=list(self.image_mean), image_std=list(self.image_std), resample=self.resample,
                   size=self.size, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (directory / CONFIG_NAME).write_text(text, encoding="utf-8")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after Qwen's `smart_resize`: sides multiples of `factor`, pixels within the
        limits, aspect ratio kept as well as that allows. ValueError for an aspect ratio over 200.

        The same arithmetic as `transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize`
        (compared over thousands of sizes in tests/data/test_image_settings.py); written out here
        because importing that module costs seconds (see the module docstring).
        """
        factor = self.factor
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                             f"{max(height, width) / min(height, width)}")
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar, w_bar


def settings_file(directory: Path) -> tuple[Path, dict[str, Any]]:
    """(file, image processor settings) of a directory, read where transformers 5 reads them: the `image_processor`
    entry of processor_config.json, else preprocessor_config.json; ({that file}, {}) when there are none."""
    nested = directory / PROCESSOR_CONFIG_NAME
    for path in (nested, directory / CONFIG_NAME):
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise VlmtuneError(f"{path}: not a usable image processor config ({exc})") from None
        if path == nested:
            if isinstance(config, dict) and config.get("image_processor") is None:
                continue  # an older processor file, without the settings: they are in preprocessor_config.json
            if not isinstance(config, dict) or not isinstance(config["image_processor"], dict):
                got = config["image_processor"] if isinstance(config, dict) else config
                raise VlmtuneError(f"{path}: field 'image_processor': expected an object of image settings, got "
                                   f"{type(got).__name__}")
            return path, config["image_processor"]
        if not isinstance(config, dict):
            raise VlmtuneError(f"{path}: not a usable image processor config (expected a JSON object)")
        return path, config
    return directory / CONFIG_NAME, {}


def tower_settings(directory: Path) -> dict[str, int]:
    """Patch, merge and temporal patch size as the model's config.json gives them (`vision_config`); {} for a
    directory without one (an adapter's processor) or keys it leaves out."""
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        vision = json.loads(path.read_text(encoding="utf-8")).get("vision_config") or {}
        given = {key: vision[name] for key, name in TOWER_KEYS.items() if vision.get(name) is not None}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}  # an unreadable config.json is reported, in one line, by whatever loads the model
    for key, value in given.items():  # the tower is built from these: "14", 14.5 or -14 builds no usable one
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VlmtuneError(f"{path}: field 'vision_config.{TOWER_KEYS[key]}': must be a positive whole number, "
                               f"got {value!r}")
    return given
