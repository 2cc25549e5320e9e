"""Generation: greedy by default, batched with left padding, stopping at `<|im_end|>`.

Every sampling setting is passed explicitly. transformers fills the settings a call leaves unset from
the model's `generation_config.json`, and Qwen2.5-VL-Instruct ships `repetition_penalty: 1.05`,
`top_k: 1`, `temperature: 0.1`: left in, "greedy" decoding would quietly apply a repetition penalty.
Temperature 0 means greedy (argmax); a temperature above 0 samples from the full distribution
(top_k / top_p off) with a seed, so a rerun gives the same answers.

With a reasoning template (`qwen3_vl`) the answer is the text after the end of the model's thought
(`Template.answer_of`): the thought is generated (with enable_thinking) or closes the prompt
(without), and is never part of the answer that is written or compared with the label.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from vlmtune.data.conversation import Conversation
from vlmtune.data.batch import Batch
from vlmtune.data.encode import Collator, EncodedSample
from vlmtune.data.processor import Processor
from vlmtune.infer.scoring import encode_prompts, evaluating, to_model
from vlmtune.model.compat import image_inputs, unwrap


def sampling_kwargs(max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                    repetition_penalty: float = 1.0) -> dict:
    """Generation settings with nothing left for the model's generation_config to fill in (top_k 0: all tokens)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    # The penalties apply to greedy decoding too; the warpers (top_k, top_p, ...) only when sampling.
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1,
                  repetition_penalty=float(repetition_penalty), no_repeat_ngram_size=0, do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), typical_p=1.0)
    return kwargs


def generate_samples(model: torch.nn.Module, processor: Processor, samples: Sequence[EncodedSample],
                     max_new_tokens: int = 32, temperature: float = 0.0, seed: int | None = None,
                     should_stop: Callable[[], bool] | None = None) -> list[str]:
    """Answers (new text, special tokens dropped, stripped) for encoded prompt samples, one batch.

    The caller puts the model in eval mode under no_grad (see `scoring.evaluating`). `should_stop` is asked
    after every token; True ends the generation there (a server whose client went away).
    """
    batch = Collator(processor, padding_side="left", raw_images=True)(list(samples))
    return generate_batch(model, processor, batch, max_new_tokens, temperature, seed, should_stop)


def stopping_criteria(should_stop: Callable[[], bool] | None):
    """transformers' stopping criteria that end every row when `should_stop()` turns true."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AskEveryToken(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([AskEveryToken()] if should_stop is not None else [])


def generate_batch(model: torch.nn.Module, processor: Processor, batch: Batch, max_new_tokens: int = 32,
                   temperature: float = 0.0, seed: int | None = None,
                   should_stop: Callable[[], bool] | None = None, **sampling) -> list[str]:
    """`generate_samples` for an already collated, LEFT-padded batch (`sampling`: top_p, top_k,
    repetition_penalty of `sampling_kwargs`)."""
    core = unwrap(model)
    inputs = to_model(batch, core)  # the images go through the vision tower here, once
    if seed is not None:
        torch.manual_seed(seed)
    stops = processor.stop_token_ids()
    with image_inputs(core, inputs) as inputs:
        output = core.generate(**inputs, **sampling_kwargs(max_new_tokens, temperature, **sampling),
                               eos_token_id=stops, pad_token_id=processor.pad_token_id,
                               stopping_criteria=stopping_criteria(should_stop))
    new_tokens = output[:, batch.input_ids.shape[1]:]
    texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [processor.template.answer_of(text) for text in texts]


def generate_conversations(model, processor: Processor, conversations: list[Conversation], batch_size: int = 8,
                           max_new_tokens: int = 32, temperature: float = 0.0, seed: int | None = None,
                           default_system: str | None = None,
                           images: list[list[torch.Tensor]] | None = None,
                           should_stop: Callable[[], bool] | None = None) -> list[str]:
    """Generated answers for conversations (their final answer is dropped from the prompt).

    With sampling, each batch is seeded with `seed + index of its first sample`, so the answers do
    not depend on what ran before.
    """
    out: list[str] = []
    with evaluating(model):
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start:start + batch_size]
            chunk_images = images[start:start + batch_size] if images is not None else None
            samples = encode_prompts(chunk, processor, default_system, chunk_images, prompt="generate")
            out += generate_samples(model, processor, samples, max_new_tokens, temperature,
                                    None if seed is None else seed + start, should_stop)
    return out
