"""The qwen2_vl chat template: Qwen2-VL / Qwen2.5-VL's own chat format, rendered as text with the
character spans that training learns from.

Rendering follows the model's Jinja chat template exactly (see tests/data/test_template.py, which
compares against the tokenizer's own `apply_chat_template`)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>×n<|vision_end|>判断以上图片...<|im_end|>\\n
    <|im_start|>assistant\\n满足要求<|im_end|>\\n

`<image>` in a message becomes vision_start + n image pads + vision_end, n from the image's grid.
The learned spans are each assistant message's content plus its `<|im_end|>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtune.data.conversation import IMAGE_PLACEHOLDER, Message

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"

# Qwen2-VL / Qwen2.5-VL-Instruct's chat template, written into models vlmtune builds and exports.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Rendered:
    text: str
    label_spans: list[tuple[int, int]]  # character [start, end) ranges that are trained on


def expand_images(content: str, image_tokens: list[int]) -> str:
    """Replace each `<image>` with vision_start + n pads + vision_end (n per image, in order)."""
    pieces = content.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(image_tokens):
        raise ValueError(f"{len(pieces) - 1} <image> placeholders but {len(image_tokens)} images")
    out = [pieces[0]]
    for n, piece in zip(image_tokens, pieces[1:]):
        out.append(VISION_START + IMAGE_PAD * n + VISION_END + piece)
    return "".join(out)


def render(messages: list[Message], image_tokens: list[int], default_system: str | None = None,
           add_generation_prompt: bool = False) -> Rendered:
    """Render messages (system optional, then user/assistant turns) in the qwen2_vl format.

    image_tokens: the number of image tokens of each image, in order of the `<image>` placeholders.
    add_generation_prompt: end with an open assistant turn (for prediction: messages end with a user turn).
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    remaining = list(image_tokens)

    def emit(piece: str) -> None:
        nonlocal length
        parts.append(piece)
        length += len(piece)

    if not messages or messages[0].role != "system":
        emit(f"{IM_START}system\n{default_system or DEFAULT_SYSTEM}{IM_END}\n")
    for message in messages:
        count = message.content.count(IMAGE_PLACEHOLDER)
        content = expand_images(message.content, remaining[:count])
        remaining = remaining[count:]
        emit(f"{IM_START}{message.role}\n")
        start = length
        emit(f"{content}{IM_END}")
        if message.role == "assistant":
            spans.append((start, length))
        emit("\n")
    if remaining:
        raise ValueError(f"{len(remaining)} image(s) without an <image> placeholder")
    if add_generation_prompt:
        emit(f"{IM_START}assistant\n")
    return Rendered("".join(parts), spans)


def display_prompt(messages: list[Message], default_system: str | None = None) -> str:
    """The rendered prompt with `<image>` left as the placeholder (for prediction files and logs)."""
    n = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
    text = render(messages, [0] * n, default_system, add_generation_prompt=True).text
    return text.replace(VISION_START + VISION_END, IMAGE_PLACEHOLDER)
