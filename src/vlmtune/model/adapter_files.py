"""An adapter directory, read once: peft's `adapter_config.json` and weights, and what vlmtune saves next to them.

Prediction, the servers, the sweep and export all ask the same questions of an adapter — is it one, which base
model did it train on, which chat template and image pixel limits did it train with — and a predict run asks them
four or five times. :func:`adapter_files` answers them from one read, cached as long as the files are unchanged
(a run that trains and then predicts reads the adapter it has just written, not an old copy).

Files of an adapter directory:

- `adapter_config.json` (peft): `peft_type`, `r`, `base_model_name_or_path`, `modules_to_save`, `use_dora`, ...
- `adapter_model.safetensors` (or peft's older `adapter_model.bin`): the weights; the safetensors header is read
  here so that a truncated file fails in one line before the model loads.
- `vlmtune_template.json` (`data.processor.TEMPLATE_RECORD`): the chat template and enable_thinking it trained with.
- `preprocessor_config.json`: the image pixel limits it trained with (`size.longest_edge` / `shortest_edge`).
- `vlmtune_quantization.json` (`model.quantize.RECORD`, QLoRA only): how its base was quantized in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from vlmtune.data.processor import saved_template
from vlmtune.errors import VlmtuneError, brief
from vlmtune.files import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class AdapterFiles:
    """What an adapter directory says about itself (see the module docstring)."""

    directory: Path
    config: dict[str, Any] = field(hash=False, compare=False)
    weights: Path
    template: str | None = None  # the chat template it trained with (None: no record)
    enable_thinking: bool | None = None
    max_pixels: int | None = None  # the image pixel limits it trained with (None: not saved)
    min_pixels: int | None = None
    quantization: Any = None  # how its base was quantized in training (`model.quantize.Quantization`), QLoRA only

    @property
    def base_model(self) -> str | None:
        """`base_model_name_or_path`: the model it was trained on, if recorded."""
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "LORA"))

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))


def adapter_files(directory: str | Path) -> AdapterFiles:
    """The adapter in `directory`, or a one-line error saying why it is not one (no directory, no config, a
    config that is not a JSON object, missing or damaged weights, a bad template or pixel record)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise VlmtuneError(f"{path}: adapter directory not found")
    return _read(path.resolve(), _stamps(path))


def _stamps(path: Path) -> tuple:
    """(name, modification time, size) of every file: the cache key that notices a rewritten adapter."""
    stamps = []
    for child in path.iterdir():
        try:
            info = child.stat()
        except OSError:
            continue
        stamps.append((child.name, info.st_mtime_ns, info.st_size))
    return tuple(sorted(stamps))


@lru_cache(maxsize=32)
def _read(path: Path, stamps: tuple) -> AdapterFiles:
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise VlmtuneError(f"{path}: no {ADAPTER_CONFIG} (not a LoRA adapter directory)")
    config = read_json_object(config_path)
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise VlmtuneError(f"{config_path}: field 'base_model_name_or_path' must be a string, got {base!r}")
    weights = next((path / name for name in WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise VlmtuneError(f"{path}: no {WEIGHTS[0]} (the adapter weights are missing)")
    if weights.suffix == ".safetensors":
        check_safetensors(weights)
    template, enable_thinking = saved_template(path)
    max_pixels, min_pixels = saved_pixel_limits(path)
    from vlmtune.model.quantize import read_record  # imports torch: only once an adapter is really read

    return AdapterFiles(path, config, weights, template, enable_thinking, max_pixels, min_pixels, read_record(path))


def check_safetensors(path: Path) -> None:
    """Read a .safetensors header (not the tensors): a truncated or foreign file fails here, in one line,
    before the model loads. safetensors checks that the header covers the whole file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise VlmtuneError(f"{path}: not a readable safetensors file ({brief(exc)}); the adapter is damaged") from None


def saved_pixel_limits(directory: str | Path) -> tuple[int | None, int | None]:
    """(max_pixels, min_pixels) from a saved `preprocessor_config.json`, (None, None) when absent."""
    path = Path(directory) / PREPROCESSOR_CONFIG
    if not path.is_file():
        return None, None
    config = read_json_object(path)
    size = config.get("size") or {}
    if not isinstance(size, dict):
        raise VlmtuneError(f"{path}: field 'size' must be an object, got {size!r}")
    max_pixels = size.get("longest_edge", config.get("max_pixels"))
    min_pixels = size.get("shortest_edge", config.get("min_pixels"))
    limits = []
    for key, value in (("size.longest_edge", max_pixels), ("size.shortest_edge", min_pixels)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise VlmtuneError(f"{path}: field '{key}' must be a pixel count (an integer > 0), got {value!r}")
        limits.append(value)
    return limits[0], limits[1]
