"""Tokenizer + image settings + chat template of a model, without needing torchvision.

transformers' `AutoProcessor` for Qwen2.5-VL and Qwen3-VL also builds a video processor, which
requires torchvision; the CPU build of torch has no matching torchvision. vlmtune reads images only
and resizes and patchifies them itself (`data.images`, equal to `Qwen2VLImageProcessorPil`), so it
pairs the tokenizer with the image settings of `preprocessor_config.json` read as plain JSON
(`data.image_settings`: importing transformers' image processor costs seconds of start-up), the
family's defaults filling keys the file leaves out. The same code on every machine keeps pixel
values identical between those that train and those that predict.

The processor also carries the model's family (`vlmtune.families`) and the chat template the run
renders with (`data.template`): the one asked for, if it fits the family, else the family's default.
It is saved with every adapter (`vlmtune_template.json`), so prediction renders as training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.data.image_settings import ImageSettings
from vlmtune.data.template import Template, get_template
from vlmtune.errors import VlmtuneError, brief
from vlmtune.families import Family, chat_template_text, family_of_dir, family_of_type
from vlmtune.files import read_json_object, write_atomic

TEMPLATE_RECORD = "vlmtune_template.json"


@dataclass
class Processor:
    tokenizer: Any
    image_processor: ImageSettings  # named as in transformers' processors
    template: Template
    family: Family

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.template.tokens.image_pad)

    @property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.template.tokens.video_pad)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(
            self.template.tokens.end_of_text)

    @property
    def score_padding(self) -> str:
        """How prompt batches that continue from their cache (label scoring) are padded: right (plain causal
        attention, the last layer only where it is read: `infer.last_positions`), or left for a family with
        recurrent layers, whose state after a right-padded prompt has run over the pads."""
        return "left" if self.family is not None and self.family.recurrent_state else "right"

    def stop_token_ids(self) -> list[int]:
        """The end of the assistant turn (`<|im_end|>`), and the end of text when the tokenizer has it."""
        tok, tokens = self.tokenizer, self.template.tokens
        ids = [tok.convert_tokens_to_ids(tokens.turn_end)]
        eot = tok.convert_tokens_to_ids(tokens.end_of_text)
        if eot is not None and eot != tok.unk_token_id and eot not in ids:
            ids.append(eot)
        return ids

    @property
    def min_pixels(self) -> int:
        return self.image_processor.min_pixels

    @property
    def max_pixels(self) -> int:
        return self.image_processor.max_pixels

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        record = {"template": self.template.name, "enable_thinking": self.template.enable_thinking,
                  "model_type": self.family.model_types[0]}
        write_atomic(Path(directory) / TEMPLATE_RECORD, json.dumps(record) + "\n")


def saved_template(directory: str | Path) -> tuple[str | None, bool | None]:
    """(template name, enable_thinking) saved with an adapter; (None, None) when it has no record."""
    path = Path(directory) / TEMPLATE_RECORD
    if not path.is_file():
        return None, None
    record = read_json_object(path)
    name, thinking = record.get("template"), record.get("enable_thinking")
    if not isinstance(name, str) or not isinstance(thinking, (bool, type(None))):
        raise VlmtuneError(f"{path}: not a usable template record (expected {{\"template\": name, "
                           f"\"enable_thinking\": true|false}})")
    return name, thinking


def family_of(directory: Path) -> Family:
    """The family of a model directory (its config.json), or of an adapter's saved processor (its record)."""
    record = directory / TEMPLATE_RECORD
    if not (directory / "config.json").is_file() and record.is_file():
        return family_of_type(read_json_object(record).get("model_type"), str(record))
    return family_of_dir(directory)


def choose_template(family: Family, model_dir: Path, requested: str | None, chat_template: str | None,
                    enable_thinking: bool | None) -> Template:
    """The template asked for (refused when it does not fit the family), else the family's default: its
    reasoning template when the checkpoint's own chat template thinks, else its first — with the family's
    default enable_thinking when the run sets none (LLaMA-Factory's, true, for a template named in the run)."""
    if requested is None:
        thinks = family.thinking_template is not None and family.tokens.thought_open in (chat_template or "")
        requested = family.thinking_template if thinks else family.template_names[0]
        if enable_thinking is None:
            enable_thinking = family.default_enable_thinking
    template = get_template(requested, True if enable_thinking is None else enable_thinking, family.tokens)
    if template.name not in family.template_names:
        fits = " or ".join(family.template_names)
        raise VlmtuneError(f"template: '{requested}' does not fit {model_dir} ({family.name}); use {fits}")
    return template


def own_chat_template(tokenizer, model_dir: Path, family: Family) -> str:
    """The model's chat template: the tokenizer's, else the directory's chat_template.jinja / .json (a
    processor's, which AutoTokenizer does not read), else the family's own."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if (model_dir / "chat_template.json").is_file():
        value = read_json_object(model_dir / "chat_template.json").get("chat_template")
        if isinstance(value, str) and value:
            return value
    return chat_template_text(family)


def load_processor(model_dir: str | Path, max_pixels: int | None = None, min_pixels: int | None = None,
                   template: str | None = None, enable_thinking: bool | None = None) -> Processor:
    """Tokenizer, image settings (pixel limits applied) and chat template of a local model directory (or of
    the processor saved with an adapter)."""
    import transformers

    model_dir = Path(model_dir)
    family = family_of(model_dir)
    if template is None:  # an exported model records the template its adapter was trained with
        template, saved_thinking = saved_template(model_dir)
        enable_thinking = saved_thinking if enable_thinking is None else enable_thinking
    # An explicit template is checked before the (slower) tokenizer load; the default depends on its chat template.
    chosen = choose_template(family, model_dir, template, None, enable_thinking) if template is not None else None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise VlmtuneError(f"{model_dir}: cannot load the tokenizer ({brief(exc, 300)})") from None
    image_pad = family.tokens.image_pad
    if tokenizer.convert_tokens_to_ids(image_pad) in (None, tokenizer.unk_token_id):
        raise VlmtuneError(f"{model_dir}: the tokenizer has no {image_pad} token; not a {family.name} model")
    tokenizer.chat_template = own_chat_template(tokenizer, model_dir, family)
    image_settings = ImageSettings.from_pretrained(model_dir, max_pixels, min_pixels, defaults=family.image_defaults)
    chosen = chosen or choose_template(family, model_dir, None, tokenizer.chat_template, enable_thinking)
    return Processor(tokenizer=tokenizer, image_processor=image_settings, template=chosen, family=family)
