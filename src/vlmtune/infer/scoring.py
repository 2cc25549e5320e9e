"""Label scoring: P(label | prompt) for every candidate of a closed label set, without generation.

For answers from a small fixed set ("满足要求" / "不满足要求") the question "which label does the model
prefer" has an exact answer: the log-likelihood of each label's full token sequence (its tokens and
the closing `<|im_end|>`) given the prompt, teacher-forced. P(label) is the softmax over those K
sums. There are no invalid answers, and the probabilities give thresholds, PR and ROC curves.
Whole sequences are scored, not first tokens: with Qwen's tokenizer 满足要求 = [满足, 要求] and
不满足要求 = [不, 满足, 要求], and "满足要求" is a substring of "不满足要求".

How (two forward passes per batch, whatever K):

1. The prompt batch, right padded, runs once with the KV cache on, keeping only each row's last
   prompt position's logits: log P(first label token | prompt) for every label at once. The vision
   tower and the long prompt (hundreds of image tokens) are paid once, not K times. Right padding
   puts no pad before a real token, so the prompt runs as plain causal attention with no mask.
   The images go through `model.vision.VisionEncoder` (the model's own vision tower, fewer and
   larger ops) and reach the model as `mm_encoder_outputs`.
2. The cache is repeated K times along the batch (row b·K + k) and the K continuations (label k's
   tokens except the last, right padded) run in one small forward, masking the prompt's pads;
   their logits score the remaining tokens of each label.

Qwen2-VL's 3-D rope: image tokens get (t, h, w) positions, so a text token after the prompt sits at
`max(prompt positions) + 1`, not at its index (the model stores the difference as `rope_deltas`).
Both passes get explicit position ids by the model's own rule (`get_rope_index`, or the same rule in
whole-batch ops: `infer.rope_positions`), so nothing depends on the `rope_deltas` state the model
keeps between calls (it is saved and restored around scoring).
tests/infer/test_scoring.py checks the result against one plain full forward per (sample, label).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from vlmtune.data.batch import Batch
from vlmtune.data.conversation import Conversation
from vlmtune.data.encode import Collator, EncodedSample, encode_prompt, load_images, prompt_messages
from vlmtune.data.processor import Processor
from vlmtune.families import FAMILIES, family_of_model, parts_of
from vlmtune.infer import rope_positions
from vlmtune.infer.last_positions import kept_positions
from vlmtune.model.compat import cache_kwarg, image_inputs, unwrap

# Models whose rope rule `infer.rope_positions` writes out (and is checked against on each model's first batch).
FAST_POSITIONS = tuple(name for family in FAMILIES for name in family.fast_rope_models)


# ---------------------------------------------------------------------------------------------
# Label sets (parsed and inferred in `vlmtune.labels`)


def label_token_ids(labels: Sequence[str], processor: Processor) -> list[list[int]]:
    """Token ids of each label as it appears in an answer: label tokens + `<|im_end|>`.

    Tokenised in context (after `<|im_start|>assistant\\n` and the template's answer prefix — a reasoning
    template's empty thought —, as the template renders it), so a label that starts with a space or
    newline gets the same tokens as in training.
    """
    tok = processor.tokenizer
    template = processor.template
    context = template.assistant_start + template.answer_prefix
    prefix = tok(context, add_special_tokens=False)["input_ids"]
    out = []
    for label in labels:
        if not label.strip():
            raise ValueError("empty label")
        ids = tok(context + template.content(label) + template.turn_end, add_special_tokens=False)["input_ids"]
        if ids[:len(prefix)] != prefix:  # the label merged with the newline: no clean token boundary
            raise ValueError(f"label {label!r} does not start at a token boundary after the assistant prefix")
        out.append(ids[len(prefix):])
    if len({tuple(ids) for ids in out}) != len(out):
        raise ValueError(f"labels {list(labels)} are not distinct after tokenisation")
    return out


# ---------------------------------------------------------------------------------------------
# Model plumbing


def output_cache(output):
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no_grad for the duration; every module's train/eval flag and the rope state come back."""
    modes = [(module, module.training) for module in model.modules()]
    core = unwrap(model)
    rope = parts_of(core).owner if family_of_model(core) is not None else None
    saved_deltas = getattr(rope, "rope_deltas", None)
    model.eval()
    try:
        with torch.no_grad():
            yield core
    finally:
        if rope is not None:
            rope.rope_deltas = saved_deltas
        for module, training in modes:
            module.training = training


def model_device(core: torch.nn.Module) -> torch.device:
    return next(core.parameters()).device


def to_model(batch: Batch, core: torch.nn.Module) -> dict:
    """The model's inputs on its device, the images already through the vision tower.

    Images (`pixel_values`, or the raw `image_pixels` of `Collator(..., raw_images=True)`) become
    `mm_encoder_outputs` computed by `model.vision.VisionEncoder` — the model's own vision tower and
    merger, run in fewer and larger ops — so the model's forward (and `generate`) skip the tower.
    """
    device = model_device(core)
    moved = batch.to(device)
    out = moved.model_inputs()
    pixels = out.pop("pixel_values", None)
    if batch.image_pixels is not None or pixels is not None:
        from vlmtune.data.features import encoder_outputs
        from vlmtune.model.vision import vision_encoder

        encoder = vision_encoder(parts_of(core).vision_tower)
        grid = out["image_grid_thw"]
        features = (encoder.still_images(batch.image_pixels, grid, batch.image_settings)
                    if batch.image_pixels is not None else encoder(pixels, grid))
        out["mm_encoder_outputs"] = encoder_outputs(encoder.split(features, grid), family_of_model(core))
    return out


def prompt_positions(core: torch.nn.Module, batch: dict) -> torch.Tensor:
    """3-D rope positions (3, B, S) of a padded prompt batch, as the model computes them itself.

    Text and still images: `infer.rope_positions` (whole-batch ops), checked against the model's
    `get_rope_index` on its first batch — a model whose rule differs keeps the library's from then on.
    """
    rope = parts_of(core).owner
    args = (batch["input_ids"], batch["mm_token_type_ids"], batch["attention_mask"], batch.get("image_grid_thw"))
    verdict = rope.__dict__.get("_vlmtune_fast_positions")
    fast = None
    if verdict is not False and type(rope).__name__ in FAST_POSITIONS:
        fast = rope_positions.positions(*args, rope.config.vision_config.spatial_merge_size)
    if fast is not None and verdict:
        return fast
    library, _ = rope.get_rope_index(args[0], mm_token_type_ids=args[1], attention_mask=args[2], image_grid_thw=args[3])
    if fast is not None:
        rope.__dict__["_vlmtune_fast_positions"] = torch.equal(fast, library)
    return library


# ---------------------------------------------------------------------------------------------
# Scoring


def label_logprobs(model: torch.nn.Module, batch: Batch, label_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Summed log P(label tokens + <|im_end|> | prompt): (B, K) float32, for a padded prompt batch.

    `model` must already be in eval mode under no_grad (see :func:`evaluating`); `batch` comes from
    `Collator(processor, padding_side=processor.score_padding)` over `encode_prompt` samples: right padding
    where the family allows it (fastest), left padding (the prompt forward then needs a padding mask) for
    families with recurrent layers, whose state after a right-padded prompt has run over the pads — a
    right-padded batch of such a model is moved to the left here.
    """
    core = unwrap(model)
    batch = to_model(batch, core)
    mask = batch["attention_mask"]
    n_rows, width, k = mask.shape[0], mask.shape[1], len(label_ids)
    device = batch["input_ids"].device
    lengths = mask.sum(-1)
    right_padded = bool((mask == (torch.arange(width, device=device) < lengths[:, None])).all())
    if not right_padded and bool((mask[:, -1] == 0).any()):
        raise ValueError("label_logprobs needs a right- or left-padded batch")
    family = family_of_model(core)
    if right_padded and family is not None and family.recurrent_state and bool((lengths < width).any()):
        batch = padded_left(batch)
        mask, right_padded = batch["attention_mask"], False
    positions = prompt_positions(core, batch)
    cache_name = cache_kwarg(core)

    # 1. The prompt, once: cache + log P(first label token) at each row's last prompt token. Right
    # padded, no row has a pad before a real token, so plain causal attention needs no mask (the
    # attention kernels skip the upper triangle instead of reading a B×S×S mask), and the last
    # decoder layer needs to run only at that token (`infer.last_positions`).
    last = (lengths - 1 if right_padded else torch.full_like(lengths, width - 1))[:, None]
    inputs = {**batch, "attention_mask": None if right_padded else mask}
    with kept_positions(core, last) if right_padded else contextlib.nullcontext(False) as only_last, \
            image_inputs(core, inputs) as inputs:
        # Otherwise logits at the rows' last positions only (any version takes a 1-D index; one row's is picked).
        columns = None if only_last else last.flatten().unique()
        out = core(**inputs, position_ids=positions, use_cache=True, logits_to_keep=0 if only_last else columns)
    logits = out.logits[:, -1] if only_last else \
        out.logits[torch.arange(n_rows, device=device), torch.searchsorted(columns, last.flatten())]
    first = logits.float().log_softmax(-1)  # (B, V)
    first_ids = torch.tensor([ids[0] for ids in label_ids], device=device)
    scores = first[:, first_ids]  # (B, K)
    cont_len = max(len(ids) for ids in label_ids) - 1
    if cont_len == 0:
        return scores

    # 2. All K continuations from the cache, in one forward over B·K rows. Every cache layer — keys and values,
    # and the conv and recurrent states of linear-attention layers — is repeated per label (row b·K + k).
    cont, targets, valid = (t.to(device) for t in continuations(label_ids, cont_len))
    cache = output_cache(out)
    cache.reorder_cache(torch.arange(n_rows, device=device).repeat_interleave(k))
    start = positions.masked_fill(mask[None] == 0, 0).amax(dim=(0, 2)) + 1  # first position after the prompt
    cont_positions = (start.repeat_interleave(k)[:, None] + torch.arange(cont_len, device=device))
    cont_positions = cont_positions[None].expand(3, -1, -1)
    attention = torch.cat([mask.repeat_interleave(k, dim=0),
                           valid.long().repeat(n_rows, 1)], dim=1)
    out = core(input_ids=cont.repeat(n_rows, 1), attention_mask=attention, position_ids=cont_positions,
               use_cache=True, **{cache_name: cache})
    logp = out.logits.float().log_softmax(-1)  # (B·K, L, V)
    picked = logp.gather(-1, targets.repeat(n_rows, 1)[..., None])[..., 0]
    rest = (picked * valid.repeat(n_rows, 1)).sum(-1).view(n_rows, k)
    return scores + rest


def continuations(label_ids: Sequence[Sequence[int]], length: int) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, valid) of each label's continuation after its first token, right padded to `length`."""
    inputs = torch.zeros((len(label_ids), length), dtype=torch.long)
    targets = torch.zeros((len(label_ids), length), dtype=torch.long)
    valid = torch.zeros((len(label_ids), length), dtype=torch.bool)
    for j, ids in enumerate(label_ids):
        n = len(ids) - 1
        inputs[j, :n] = torch.tensor(ids[:-1])
        targets[j, :n] = torch.tensor(ids[1:])
        valid[j, :n] = True
    return inputs, targets, valid


def padded_left(batch: dict) -> dict:
    """A right-padded prompt batch with each row's tokens moved to the right end (the images stay as they are:
    they follow the rows' order, not their columns)."""
    mask = batch["attention_mask"]
    shift = mask.shape[1] - mask.sum(-1)
    columns = (torch.arange(mask.shape[1], device=mask.device) - shift[:, None]) % mask.shape[1]
    moved = {key: batch[key].gather(1, columns) for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return {**batch, **moved}


def encode_prompts(conversations: Sequence[Conversation], processor: Processor,
                   default_system: str | None = None, images: Sequence[list[torch.Tensor]] | None = None,
                   prompt: str = "score") -> list[EncodedSample]:
    """Prompt samples (messages up to the open assistant turn, for `prompt` = "score" or "generate"; see
    `data.encode.encode_prompt`), decoding images unless given."""
    samples = []
    for i, conv in enumerate(conversations):
        sample_images = images[i] if images is not None else load_images(conv, processor)
        samples.append(encode_prompt(prompt_messages(conv), sample_images, processor, default_system, prompt))
    return samples


def score_samples(model: torch.nn.Module, processor: Processor, samples: Sequence[EncodedSample],
                  label_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, K) summed label log-probs of encoded prompt samples (caller handles eval mode/no_grad)."""
    batch = Collator(processor, padding_side=processor.score_padding, raw_images=True)(list(samples))
    return label_logprobs(model, batch, label_ids)


def score_conversations(model, processor, conversations: list[Conversation], labels: list[str],
                        batch_size: int = 8, default_system: str | None = None,
                        images: list[list[torch.Tensor]] | None = None) -> list[dict[str, float]]:
    """P(label | prompt) for every conversation: one dict per conversation, labels in the given order.

    Works on a plain or peft-wrapped model in train or eval mode: scoring runs in eval mode under
    no_grad and the previous mode is restored. `images`: already decoded and resized images per
    conversation (`data.encode.load_images`), to skip decoding when scoring the same data repeatedly.
    """
    if images is not None and len(images) != len(conversations):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    label_ids = label_token_ids(labels, processor)
    out: list[dict[str, float]] = []
    with evaluating(model):
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start:start + batch_size]
            chunk_images = images[start:start + batch_size] if images is not None else None
            samples = encode_prompts(chunk, processor, default_system, chunk_images)
            probs = score_samples(model, processor, samples, label_ids).softmax(-1).tolist()
            out += [dict(zip(labels, row)) for row in probs]
    return out
