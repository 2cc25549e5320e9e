"""Tokenizer + image settings for Qwen2-VL / Qwen2.5-VL, without needing torchvision.

transformers' `AutoProcessor` for Qwen2.5-VL also builds a video processor, which requires
torchvision; the CPU build of torch has no matching torchvision. vlmtune reads images only and
resizes and patchifies them itself (`data.images`, equal to `Qwen2VLImageProcessorPil`), so it pairs
the tokenizer with the image settings of `preprocessor_config.json` read as plain JSON
(`data.image_settings`: importing transformers' image processor costs seconds of start-up). The
same code on every machine keeps pixel values identical between those that train and those that predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.data.image_settings import ImageSettings
from vlmtune.data.template import IMAGE_PAD, QWEN2_VL_CHAT_TEMPLATE
from vlmtune.errors import VlmtuneError


@dataclass
class Processor:
    tokenizer: Any
    image_processor: ImageSettings  # named as in transformers' processors

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    @property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<|video_pad|>")

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")

    @property
    def min_pixels(self) -> int:
        return self.image_processor.min_pixels

    @property
    def max_pixels(self) -> int:
        return self.image_processor.max_pixels

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


def load_processor(model_dir: str | Path, max_pixels: int | None = None, min_pixels: int | None = None) -> Processor:
    """Tokenizer and image settings of a local model directory, with pixel limits applied."""
    import transformers

    model_dir = Path(model_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise VlmtuneError(f"{model_dir}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.convert_tokens_to_ids(IMAGE_PAD) in (None, tokenizer.unk_token_id):
        raise VlmtuneError(f"{model_dir}: the tokenizer has no {IMAGE_PAD} token; not a Qwen2-VL model")
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    image_settings = ImageSettings.from_pretrained(model_dir, max_pixels, min_pixels)
    return Processor(tokenizer=tokenizer, image_processor=image_settings)
