"""Chat templates: a conversation rendered as text, with the character spans that training learns from.

The template names are LLaMA-Factory's (`template:` in the YAML), each rendering its family's own chat
format exactly (tests/data/test_template.py compares against the tokenizer's `apply_chat_template`
with each family's released Jinja template)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n          (qwen2_vl only: a default system turn)
    <|im_start|>user\\n<|vision_start|><|image_pad|>×n<|vision_end|>判断以上图片...<|im_end|>\\n
    <|im_start|>assistant\\n满足要求<|im_end|>\\n

* `qwen2_vl` — Qwen2-VL and Qwen2.5-VL: "You are a helpful assistant." when a conversation has no
  system turn.
* `qwen3_vl_nothink` — Qwen3-VL Instruct models: no default system turn.
* `qwen3_vl` — Qwen3-VL's reasoning template: an assistant answer without a thought block gets an
  empty one, `<think>\\n\\n</think>\\n\\n`. With `enable_thinking: true` (LLaMA-Factory's default) it is
  part of the answer and trained on; with `false` it closes the prompt and is not trained on (and any
  thought already in an answer is removed). The text is the same either way; only the labels differ.

`<image>` in a message becomes vision_start + n image pads + vision_end, n from the image's grid.
The learned spans are each assistant message's content plus its `<|im_end|>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from vlmtune.data.conversation import IMAGE_PLACEHOLDER, Message
from vlmtune.errors import VlmtuneError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
ASSISTANT_START = f"{IM_START}assistant\n"


@dataclass
class Rendered:
    text: str
    label_spans: list[tuple[int, int]]  # character [start, end) ranges that are trained on


@dataclass(frozen=True)
class Template:
    """One chat format (a `template:` name) with its settings for this run."""

    name: str
    default_system: str | None  # the system turn of conversations without one (None: no system turn)
    thought_words: tuple[str, str] | None = None  # reasoning templates: how a thought opens and closes
    enable_thinking: bool = True  # reasoning templates: the empty thought is trained on (True) or prompt (False)

    @property
    def empty_thought(self) -> str:
        return "".join(self.thought_words) if self.thought_words else ""

    @property
    def answer_prefix(self) -> str:
        """What stands between `<|im_start|>assistant\\n` and every answer in the rendered text: the
        empty thought of a reasoning template. Scoring conditions on it; it is the same for every label."""
        return self.empty_thought

    def remove_thought(self, text: str) -> str:
        """`text` without its thought blocks (LLaMA-Factory's remove_thought: also leading newlines)."""
        if not self.thought_words:
            return text
        start, end = self.thought_words
        return re.sub(f"{re.escape(start)}(.*?){re.escape(end)}", "", text, flags=re.DOTALL).lstrip("\n")

    def answer_of(self, generated: str) -> str:
        """The answer in generated text: after the (last) end of a thought for a reasoning template — the
        model may also write only the end, when the prompt opened the thought —, stripped."""
        if self.thought_words:
            close = self.thought_words[1].strip()
            if close in generated:
                generated = generated.rsplit(close, 1)[1]
        return generated.strip()

    def has_thought(self, text: str) -> bool:
        return bool(self.thought_words) and any(w.strip() in text for w in self.thought_words)

    def render(self, messages: list[Message], image_tokens: list[int], default_system: str | None = None,
               prompt: str | None = None) -> Rendered:
        """Render messages (system optional, then user/assistant turns).

        image_tokens: the number of image tokens of each image, in order of the `<image>` placeholders.
        prompt: None renders the whole conversation (training); "generate" ends with the open assistant
        turn as generation starts it (the messages end with a user turn); "score" ends where every
        answer's own text starts (after `answer_prefix`).
        """
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        length = 0
        remaining = list(image_tokens)

        def emit(piece: str) -> None:
            nonlocal length
            parts.append(piece)
            length += len(piece)

        system = default_system if default_system is not None else self.default_system
        if (not messages or messages[0].role != "system") and system is not None:
            emit(f"{IM_START}system\n{system}{IM_END}\n")
        for message in messages:
            count = message.content.count(IMAGE_PLACEHOLDER)
            content = expand_images(message.content, remaining[:count])
            remaining = remaining[count:]
            emit(f"{IM_START}{message.role}\n")
            if message.role == "assistant":
                content, unlabelled = self._answer(content)
                emit(unlabelled)
                start = length
                emit(f"{content}{IM_END}")
                spans.append((start, length))
            else:
                emit(f"{content}{IM_END}")
            emit("\n")
        if remaining:
            raise ValueError(f"{len(remaining)} image(s) without an <image> placeholder")
        if prompt is not None:
            emit(ASSISTANT_START)
            if self.thought_words and (prompt == "score" or not self.enable_thinking):
                emit(self.empty_thought)
        return Rendered("".join(parts), spans)

    def _answer(self, content: str) -> tuple[str, str]:
        """(labelled answer text, unlabelled text before it) of one assistant message."""
        if not self.thought_words:
            return content, ""
        if not self.enable_thinking:
            content = self.remove_thought(content)
        if self.has_thought(content):
            return content, ""
        return (self.empty_thought + content, "") if self.enable_thinking else (content, self.empty_thought)

    def display_prompt(self, messages: list[Message], default_system: str | None = None) -> str:
        """The generation prompt with `<image>` left as the placeholder (for prediction files and logs)."""
        n = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
        text = self.render(messages, [0] * n, default_system, prompt="generate").text
        return text.replace(VISION_START + VISION_END, IMAGE_PLACEHOLDER)


def expand_images(content: str, image_tokens: list[int]) -> str:
    """Replace each `<image>` with vision_start + n pads + vision_end (n per image, in order)."""
    pieces = content.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(image_tokens):
        raise ValueError(f"{len(pieces) - 1} <image> placeholders but {len(image_tokens)} images")
    out = [pieces[0]]
    for n, piece in zip(image_tokens, pieces[1:]):
        out.append(VISION_START + IMAGE_PAD * n + VISION_END + piece)
    return "".join(out)


TEMPLATES: dict[str, Template] = {
    "qwen2_vl": Template("qwen2_vl", default_system="You are a helpful assistant."),
    "qwen3_vl_nothink": Template("qwen3_vl_nothink", default_system=None),
    "qwen3_vl": Template("qwen3_vl", default_system=None, thought_words=("<think>\n", "\n</think>\n\n")),
}
ALIASES = {"qwen2_5_vl": "qwen2_vl"}  # accepted by earlier vlmtune versions
TEMPLATE_NAMES = (*TEMPLATES, *ALIASES)


def get_template(name: str, enable_thinking: bool = True) -> Template:
    """The template of a `template:` name (aliases accepted) with this run's enable_thinking."""
    canonical = ALIASES.get(name, name)
    if canonical not in TEMPLATES:
        raise VlmtuneError(f"template: unknown template '{name}' (known: {', '.join(TEMPLATE_NAMES)})")
    return replace(TEMPLATES[canonical], enable_thinking=bool(enable_thinking))
