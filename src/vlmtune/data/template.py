"""Chat templates: a conversation rendered as text, with the character spans that training learns from.

The template names are LLaMA-Factory's (`template:` in the YAML); each family declares the ones that fit it
(`vlmtune.families`: `TemplateSpec`), and each renders its family's own chat format exactly
(tests/data/test_template.py compares against the tokenizer's `apply_chat_template` with each family's released
Jinja template)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n          (qwen2_vl only: a default system turn)
    <|im_start|>user\\n<|vision_start|><|image_pad|>×n<|vision_end|>判断以上图片...<|im_end|>\\n
    <|im_start|>assistant\\n满足要求<|im_end|>\\n

* `qwen2_vl` — Qwen2-VL and Qwen2.5-VL: "You are a helpful assistant." when a conversation has no
  system turn.
* `qwen3_vl_nothink` — Qwen3-VL Instruct models: no default system turn.
* Reasoning templates (`qwen3_vl`; Qwen3.5's `qwen3_5`, `qwen3_6`, `qwen3_8`): an assistant answer without a
  thought block gets an empty one, `<think>\\n\\n</think>\\n\\n`. With `enable_thinking: true` (LLaMA-Factory's
  default) it is part of the answer and trained on; with `false` it closes the prompt and is not trained on
  (and any thought already in an answer is removed). The text is the same either way; only the labels differ.
  Qwen3.5's render as its released template does: contents trimmed, no thought in assistant turns before the
  last user turn, and with thinking on the generation prompt opens the thought (`<think>\\n`).
* `qwen3_5_nothink` — LLaMA-Factory's Qwen3.5 rendering without any thought block.

`<image>` in a message becomes vision_start + n image pads + vision_end, n from the image's grid.
The learned spans are each assistant message's content plus its `<|im_end|>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmtune.data.conversation import IMAGE_PLACEHOLDER, Message
from vlmtune.errors import VlmtuneError
from vlmtune.families import CHATML, SpecialTokens, TemplateSpec, template_specs


@dataclass
class Rendered:
    text: str
    label_spans: list[tuple[int, int]]  # character [start, end) ranges that are trained on


@dataclass(frozen=True)
class Template:
    """One chat format (a `template:` name, its family's `TemplateSpec`) with this run's enable_thinking."""

    spec: TemplateSpec
    enable_thinking: bool = True  # reasoning templates: the empty thought is trained on (True) or prompt (False)
    tokens: SpecialTokens = CHATML

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        """The template as logs and prediction metadata show it: its name, and enable_thinking where it matters."""
        if not self.thought_words:
            return self.name
        return f"{self.name} (enable_thinking: {str(self.enable_thinking).lower()})"

    @property
    def default_system(self) -> str | None:
        return self.spec.default_system

    @property
    def thought_words(self) -> tuple[str, str] | None:
        """How a thought opens and closes, for a reasoning template; None otherwise."""
        return self.tokens.thought_words if self.spec.reasoning else None

    @property
    def assistant_start(self) -> str:
        return self.tokens.assistant_start

    @property
    def turn_end(self) -> str:
        return self.tokens.turn_end

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
        start_turn, end_turn = self.tokens.turn_start, self.tokens.turn_end

        def emit(piece: str) -> None:
            nonlocal length
            parts.append(piece)
            length += len(piece)

        system = default_system if default_system is not None else self.default_system
        if (not messages or messages[0].role != "system") and system is not None:
            emit(f"{start_turn}system\n{self.content(system)}{end_turn}\n")
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        for index, message in enumerate(messages):
            count = message.content.count(IMAGE_PLACEHOLDER)
            content = self.expand_images(self.content(message.content), remaining[:count])
            remaining = remaining[count:]
            emit(f"{start_turn}{message.role}\n")
            if message.role == "assistant":
                content, unlabelled = self._answer(content, history=index < last_user)
                emit(unlabelled)
                start = length
                emit(f"{content}{end_turn}")
                spans.append((start, length))
            else:
                emit(f"{content}{end_turn}")
            emit("\n")
        if remaining:
            raise ValueError(f"{len(remaining)} image(s) without an <image> placeholder")
        if prompt is not None:
            emit(self.assistant_start)
            if self.thought_words and (prompt == "score" or not self.enable_thinking):
                emit(self.empty_thought)
            elif self.thought_words and self.spec.prompt_opens_thought:
                emit(self.thought_words[0])
        return Rendered("".join(parts), spans)

    def content(self, content: str) -> str:
        """A message's content as the template writes it (trimmed by the templates whose release trims it)."""
        return content.strip() if self.spec.trim_content else content

    def _answer(self, content: str, history: bool = False) -> tuple[str, str]:
        """(labelled answer text, unlabelled text before it) of one assistant message (`history`: one before
        the last user turn)."""
        if not self.thought_words:
            return content, ""
        if history and not self.spec.history_thoughts:
            return self.remove_thought(content), ""
        if not self.enable_thinking:
            content = self.remove_thought(content)
        if self.has_thought(content):
            return content, ""
        return (self.empty_thought + content, "") if self.enable_thinking else (content, self.empty_thought)

    def display_prompt(self, messages: list[Message], default_system: str | None = None) -> str:
        """The generation prompt with `<image>` left as the placeholder (for prediction files and logs)."""
        n = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
        text = self.render(messages, [0] * n, default_system, prompt="generate").text
        return text.replace(self.tokens.vision_start + self.tokens.vision_end, IMAGE_PLACEHOLDER)

    def expand_images(self, content: str, image_tokens: list[int]) -> str:
        """Replace each `<image>` with vision_start + n pads + vision_end (n per image, in order)."""
        return expand_images(content, image_tokens, self.tokens)


def expand_images(content: str, image_tokens: list[int], tokens: SpecialTokens = CHATML) -> str:
    """Replace each `<image>` with vision_start + n pads + vision_end (n per image, in order)."""
    pieces = content.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(image_tokens):
        raise ValueError(f"{len(pieces) - 1} <image> placeholders but {len(image_tokens)} images")
    out = [pieces[0]]
    for n, piece in zip(image_tokens, pieces[1:]):
        out.append(tokens.vision_start + tokens.image_pad * n + tokens.vision_end + piece)
    return "".join(out)


SPECS = template_specs()
TEMPLATE_NAMES = tuple(SPECS)
TEMPLATES: dict[str, Template] = {name: Template(spec) for name, spec in SPECS.items() if name == spec.name}


def get_template(name: str, enable_thinking: bool = True, tokens: SpecialTokens = CHATML) -> Template:
    """The template of a `template:` name (aliases accepted) with this run's enable_thinking."""
    if name not in SPECS:
        raise VlmtuneError(f"template: unknown template '{name}' (known: {', '.join(TEMPLATE_NAMES)})")
    return Template(SPECS[name], bool(enable_thinking), tokens)
