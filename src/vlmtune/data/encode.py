"""Conversation → token ids, labels and resized images; batches → model inputs.

Each image is decoded and resized once, here; its token count comes from the same resize. The text
is rendered by the processor's chat template (`data.template`) and tokenised in one call; labels are
the tokens inside the assistant spans (answer + `<|im_end|>`), everything else is -100. Nothing is
ever truncated: a sample longer than cutoff_len raises `EncodeError` (the data checks report it
before training).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmtune.data.batch import IGNORE_INDEX, Batch, LabelGather
from vlmtune.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message
from vlmtune.data.images import (ImageError, image_grids, load_resized, resize_decoded, resized_token_count,
                                 sequence_tokens, to_patches)
from vlmtune.data.processor import Processor


class EncodeError(Exception):
    """A sample that cannot be encoded; `field` names the part at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class EncodedSample:
    input_ids: torch.Tensor  # (seq,) long
    labels: torch.Tensor  # (seq,) long, -100 outside the answers
    images: list[torch.Tensor] = field(default_factory=list)  # resized uint8 (3, H, W)
    conversation: Conversation | None = None
    # Frozen-vision training: each image's features (`data.features.ImageFeatures`: image tokens × hidden,
    # and the deepstack features of Qwen3-VL), computed once and reused every epoch; the decoded pixels
    # are dropped then, so `image_grid_thw` keeps the grid.
    image_features: list | None = None
    image_grid_thw: torch.Tensor | None = None
    position: int | None = None  # its index in its split, when it was read from the encoded store

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# No real prompt averages more characters per token (English ≈ 4, Chinese ≈ 1.5; the servers' `--chars_per_token`
# default too): text longer than a token budget × this is refused without tokenising it.
MAX_CHARS_PER_TOKEN = 8


def context_length(config) -> int | None:
    """The longest sequence the language model takes (prompt + answer): max_position_embeddings of its config's
    text_config, else of the config itself."""
    for part in (getattr(config, "text_config", None), config):
        value = getattr(part, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(messages: list[Message], budget: int | None, what: str, tokens: int | None = None,
                 field: str = "messages") -> None:
    """The length rule of every command that encodes a record, against `budget` tokens (`what`: "the model's context",
    "cutoff_len"): without `tokens`, the cheap bound checked before any tokenising or image decoding — more than
    budget × MAX_CHARS_PER_TOKEN characters of text cannot fit —, with `tokens`, the count itself (image tokens
    included). An `EncodeError` naming the messages field."""
    if budget is None:
        return
    if tokens is None:
        chars = sum(len(m.content) for m in messages)
        if chars > budget * MAX_CHARS_PER_TOKEN:
            raise EncodeError(f"{chars:,} characters of text, far more than {what} of {budget:,} tokens holds "
                              f"(refused without tokenising it)", field=field)
    elif tokens > budget:
        raise EncodeError(f"{tokens:,} tokens (text and image tokens) exceed {what} of {budget:,} tokens",
                          field=field)


def image_tokens(images: list[torch.Tensor], processor: Processor) -> list[int]:
    """Tokens of each resized image (CHW): `data.images.resized_token_count`."""
    return [resized_token_count(im.shape[1], im.shape[2], processor.image_processor) for im in images]


def load_images(conversation: Conversation, processor: Processor) -> list[torch.Tensor]:
    images = []
    for i, path in enumerate(conversation.images):
        try:
            images.append(load_resized(path, processor.image_processor))
        except ImageError as exc:
            raise EncodeError(f"{exc}: {path}", field=conversation.image_field(i)) from None
    return images


def tokenize(text: str, spans: list[tuple[int, int]], processor: Processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the rendered text, and labels that keep exactly the tokens inside `spans`."""
    encoding = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(spans))
    ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    if spans:
        starts = torch.tensor([s for s, _ in encoding["offset_mapping"]])
        ends = torch.tensor([e for _, e in encoding["offset_mapping"]])
        for span_start, span_end in spans:
            inside = (starts >= span_start) & (ends <= span_end) & (ends > starts)
            # The template puts special tokens right around each span, so its edges are token edges.
            if not bool((starts == span_start).any()) or not bool((ends == span_end).any()):
                raise EncodeError("answer boundary falls inside a token", field="messages")
            labels[inside] = ids[inside]
    return ids, labels


def tokenize_rendered(messages: list[Message], images: list[torch.Tensor], processor: Processor,
                      default_system: str | None, prompt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Render and tokenise with ONE `<|image_pad|>` per image, then repeat each pad to the image's token count.

    The same ids as tokenising the text with every pad written out (`<|image_pad|>` is a special
    token: the text between special tokens is tokenised the same either way; tests/data/test_template.py),
    without making the tokenizer match hundreds of special tokens per image (a third of the time).
    """
    counts = image_tokens(images, processor)
    rendered = processor.template.render(messages, [1] * len(counts), default_system, prompt=prompt)
    ids, labels = tokenize(rendered.text, rendered.label_spans, processor)
    if not counts:
        return ids, labels
    pads = ids == processor.image_token_id
    if int(pads.sum()) != len(counts):  # e.g. the text itself spells out <|image_pad|>
        raise EncodeError(f"{int(pads.sum())} image pad tokens for {len(counts)} images", field="messages")
    repeats = torch.ones_like(ids)
    repeats[pads] = torch.tensor(counts)
    ids, labels = ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)
    assert len(ids) == sequence_tokens(len(repeats), counts)  # the rule `vlmtune data check` counts with
    return ids, labels


def encode(conversation: Conversation, processor: Processor, cutoff_len: int | None,
           default_system: str | None = None, images: list[torch.Tensor] | None = None) -> EncodedSample:
    """A training sample: the whole conversation, answers labelled."""
    if images is None:
        images = load_images(conversation, processor)
    ids, labels = tokenize_rendered(conversation.messages, images, processor, default_system, prompt=None)
    if cutoff_len is not None and len(ids) > cutoff_len:
        raise EncodeError(f"{len(ids)} tokens (with {sum(image_tokens(images, processor))} image tokens) "
                          f"exceed cutoff_len {cutoff_len}", field="messages")
    return EncodedSample(ids, labels, images, conversation)


def encode_prompt(messages: list[Message], images: list[torch.Tensor], processor: Processor,
                  default_system: str | None = None, prompt: str = "generate") -> EncodedSample:
    """A prediction sample: the messages up to an open assistant turn, nothing labelled.

    prompt: "generate" (as generation starts the answer) or "score" (up to where every answer's own text
    starts: with a reasoning template, after the empty thought; see `data.template`)."""
    ids, labels = tokenize_rendered(messages, images, processor, default_system, prompt=prompt)
    return EncodedSample(ids, labels, images)


def placeholder_sample(processor: Processor) -> EncodedSample:
    """A sample of one blank image (the smallest the processor makes) and nothing labelled: added to a batch
    without images where every rank must run the vision tower (`Collator(vision_every_batch=True)`). Its row
    attends only to itself and none of its logits is in the loss, so the loss and the gradients are those of the
    batch without it."""
    from PIL import Image

    image = resize_decoded(Image.new("RGB", (1, 1), "white"), processor.image_processor)
    return encode_prompt([Message("user", IMAGE_PLACEHOLDER)], [image], processor, prompt="generate")


def prompt_messages(conversation: Conversation) -> list[Message]:
    """The conversation without its final assistant answer."""
    messages = list(conversation.messages)
    if messages and messages[-1].role == "assistant":
        messages = messages[:-1]
    return messages


class Collator:
    """Pads samples into a batch with everything Qwen2-VL needs for its 3-D rope positions.

    `mm_token_type_ids` (1 at image tokens) must reach the model: without it transformers 5 silently
    falls back to 1-D positions for the image tokens. Samples with cached image features pass them as
    `mm_encoder_outputs` (the vision tower does not run; deepstack features included) plus
    `image_grid_thw` for the positions.

    `raw_images=True` (prediction): the resized uint8 images go out as they are (`image_pixels`, a
    list) with `image_grid_thw` and `image_settings` (how to normalise them), for
    `model.vision.VisionEncoder.still_images`, which embeds them without cutting patches; a
    model's forward does not take them.

    `vision_every_batch=True`: a batch without any image gets `placeholder_sample` as one more row, so the vision
    tower runs on every rank in every forward — under ZeRO-3 each of its forwards gathers the tower's weights from
    all ranks (a rank that skipped it would leave the others waiting forever), and under DDP a trained tower or
    projector must take part in every synchronised backward (LLaMA-Factory adds a masked image for the same reason).
    """

    def __init__(self, processor: Processor, padding_side: str = "right", raw_images: bool = False,
                 vision_every_batch: bool = False):
        self.processor = processor
        self.padding_side = padding_side
        self.raw_images = raw_images
        self.placeholder = placeholder_sample(processor) if vision_every_batch else None

    def __call__(self, samples: list[EncodedSample]) -> Batch:
        real = len(samples)
        if self.placeholder is not None and not any(s.images or s.image_features for s in samples):
            samples = [*samples, self.placeholder]
        longest = max(len(s) for s in samples)
        pad_id = self.processor.pad_token_id
        input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample)
            cols = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            input_ids[row, cols] = sample.input_ids
            labels[row, cols] = sample.labels
            attention_mask[row, cols] = 1
        mm_token_type_ids = torch.zeros_like(input_ids)
        mm_token_type_ids[input_ids == self.processor.image_token_id] = 1
        mm_token_type_ids[attention_mask == 0] = 0
        batch = Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                      mm_token_type_ids=mm_token_type_ids, num_samples=real,
                      num_tokens=sum(len(s) for s in samples[:real]), gather=LabelGather.of(labels))
        self.add_images(batch, samples)
        return batch

    def add_images(self, batch: Batch, samples: list[EncodedSample]) -> None:
        """The samples' images into the batch, in the form they come in (see `data.batch.Batch`)."""
        if any(s.image_features is not None for s in samples):
            if not all(s.image_features is not None or not s.images for s in samples):
                raise ValueError("a batch mixes cached image features and raw images")
            from vlmtune.data.features import encoder_outputs

            features = [f for s in samples if s.image_features for f in s.image_features]
            batch.image_grid_thw = torch.cat([s.image_grid_thw for s in samples if s.image_features])
            batch.mm_encoder_outputs = encoder_outputs(features, self.processor.family)
            return
        images = [im for s in samples for im in s.images]
        if images and self.raw_images:
            settings = self.processor.image_processor
            batch.image_pixels, batch.image_grid_thw = images, image_grids(images, settings)
            batch.image_settings = settings
        elif images:
            batch.pixel_values, batch.image_grid_thw = to_patches(images, self.processor.image_processor)
