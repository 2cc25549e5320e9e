"""The prediction loop shared by `vlmtune predict` and the benchmark: batches in, JSONL rows out.

A predictor (transformers here, vLLM in `vllm_backend`) has three steps per batch:

* `prepare(conversations, default_system, mode)`: CPU work — decode and resize the images, tokenise
  the prompts and pad the batch (the images stay uint8 until the vision tower). It runs in a helper
  thread one batch ahead, so it overlaps the model (PIL and the tokenizer release the GIL).
* `score(prepared, labels)` → P(label) rows, or `generate(prepared, ...)` → texts: the model.
* `check(...)` once before the run (vLLM: does the adapter change anything?).

On a CPU, score mode runs `predictor.workers` batches at once (default two), each prepared and
scored by its own thread with its share of torch's threads. Why: with a small model most of torch's
ops are too short to keep two cores busy from one calling thread (two intra-op threads finish a
batch only ≈1.6× faster than one), and the decoding / tokenising of the next batch then competes
with the model for the same cores; two whole batches side by side keep both cores busy (measured
when this was added: the git history of docs/benchmarks.md). torch releases the GIL inside its ops,
and scoring keeps no state on the model (explicit position ids, its own KV cache per call). Rows still come out in
dataset order. Generation stays on one thread: transformers' Qwen2-VL `generate` keeps its rope
offsets on the model between steps.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

from vlmtune.data.batch import Batch
from vlmtune.data.conversation import Conversation
from vlmtune.errors import VlmtuneError


def row_of(conv: Conversation, template, default_system: str | None, predict: str,
           scores: dict[str, float] | None) -> dict[str, Any]:
    """One line of the prediction JSONL (`template`: the `data.template.Template` the prompt is rendered with)."""
    from vlmtune.data.encode import prompt_messages

    row = {"id": conv.id, "images": list(conv.images),
           "prompt": template.display_prompt(prompt_messages(conv), default_system),
           "predict": predict, "label": conv.answer or ""}
    if scores is not None:
        row["scores"] = scores
    return row


def predict_batches(predictor, conversations: Sequence[Conversation], mode: str, labels: list[str] | None,
                    batch_size: int, max_new_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
                    default_system: str | None = None, first_index: int = 0, sampling: dict[str, Any] | None = None
                    ) -> Iterator[tuple[list[Conversation], list[dict[str, Any]]]]:
    """(conversations, rows) batch by batch, in order. `sampling`: top_p, top_k, repetition_penalty for
    generation (`predictor.generate`'s keywords; none: their neutral values).

    With sampling (temperature > 0) each batch is seeded with `seed + its first sample's index in the
    dataset` (`first_index` is the index of conversations[0]), so a resumed run samples as a
    fresh one would.
    """
    chunks = [list(conversations[i:i + batch_size]) for i in range(0, len(conversations), batch_size)]
    if not chunks:
        return
    workers = getattr(predictor, "workers", 1)
    if mode == "score" and workers > 1 and len(chunks) > 1:
        yield from score_concurrently(predictor, chunks, labels, default_system, workers)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmtune-prepare") as pool:
        upcoming = pool.submit(predictor.prepare, chunks[0], default_system, mode)
        offset = first_index
        for k, chunk in enumerate(chunks):
            prepared = upcoming.result()
            if k + 1 < len(chunks):
                upcoming = pool.submit(predictor.prepare, chunks[k + 1], default_system, mode)
            if mode == "score":
                probs = predictor.score(prepared, labels)
                rows = [row_of(c, predictor.processor.template, default_system, best_label(labels, p),
                               dict(zip(labels, p))) for c, p in zip(chunk, probs)]
            else:
                batch_seed = seed + offset if temperature > 0 and seed is not None else None
                texts = predictor.generate(prepared, max_new_tokens, temperature, batch_seed, **(sampling or {}))
                rows = [row_of(c, predictor.processor.template, default_system, t, None) for c, t in zip(chunk, texts)]
            offset += len(chunk)
            yield chunk, rows


def score_concurrently(predictor, chunks: list[list[Conversation]], labels: list[str], default_system: str | None,
                       workers: int) -> Iterator[tuple[list[Conversation], list[dict[str, Any]]]]:
    """Score mode with `workers` batches in flight, each prepared and scored on its own thread; in order."""
    import torch

    def prepare_and_score(chunk):
        return predictor.score(predictor.prepare(chunk, default_system, "score"), labels)

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))  # every worker's ops get this many threads
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlmtune-score") as pool:
            pending = deque(pool.submit(prepare_and_score, chunk) for chunk in chunks[:workers])
            for k, chunk in enumerate(chunks):
                probs = pending.popleft().result()
                if k + workers < len(chunks):
                    pending.append(pool.submit(prepare_and_score, chunks[k + workers]))
                yield chunk, [row_of(c, predictor.processor.template, default_system, best_label(labels, p),
                                     dict(zip(labels, p))) for c, p in zip(chunk, probs)]
    finally:
        torch.set_num_threads(threads)


def best_label(labels: list[str], probs: list[float]) -> str:
    return labels[max(range(len(probs)), key=probs.__getitem__)]


def record_error(conv: Conversation, exc) -> VlmtuneError:
    """An image or encoding problem of one sample, named by file, record and field."""
    field = getattr(exc, "field", None)
    return VlmtuneError(f"{conv.source}: record {conv.index}: " + (f"field '{field}': " if field else "") + str(exc))


class TransformersPredictor:
    """Score or generate batches with the transformers engine (see `infer.engine.load_engine`)."""

    def __init__(self, engine, workers: int = 0):
        """`workers`: score-mode batches in flight (see the module docstring); 0 = two on a CPU with at
        least two torch threads, else one."""
        import torch

        self.engine = engine
        if workers <= 0:
            workers = 2 if engine.device.type == "cpu" and torch.get_num_threads() >= 2 else 1
        self.workers = workers
        self.processor = engine.processor
        self.model_dir = engine.model_dir
        self.adapter_dir = engine.adapter_dir
        self.max_pixels = engine.processor.max_pixels
        self.min_pixels = engine.processor.min_pixels
        self.dtype_name = str(engine.dtype).replace("torch.", "")
        from vlmtune.data.encode import context_length

        # the longest prompt it takes
        self.context = context_length(getattr(getattr(engine, "model", None), "config", None))

    def prepare(self, conversations: Sequence[Conversation], default_system: str | None = None,
                mode: str = "score") -> Batch:
        """The model-ready batch: images decoded and resized once, prompts encoded, padded for `mode`
        (scoring: as the family allows, `Processor.score_padding`; generation: left), the resized images as they are."""
        from vlmtune.data.encode import (Collator, EncodeError, check_length, encode_prompt, load_images,
                                         prompt_messages)

        samples, context = [], self.context
        for conv in conversations:
            try:
                messages = prompt_messages(conv)
                # a 1 MB record is refused here, before its images are decoded or its text tokenised
                check_length(messages, context, "the model's context", field=conv.messages_field)
                samples.append(encode_prompt(messages, load_images(conv, self.processor), self.processor,
                                             default_system, prompt=mode))
                check_length(messages, context, "the model's context", len(samples[-1]), conv.messages_field)
            except (EncodeError, ValueError) as exc:
                raise record_error(conv, exc) from None
        padding = self.processor.score_padding if mode == "score" else "left"
        return Collator(self.processor, padding_side=padding, raw_images=True)(samples)

    def check(self, conversations, labels, mode, default_system=None) -> None:
        """Nothing to check: peft applies the adapter itself."""

    def score(self, batch: Batch, labels: list[str]) -> list[list[float]]:
        from vlmtune.infer.scoring import evaluating, label_logprobs, label_token_ids

        with evaluating(self.engine.model):
            logp = label_logprobs(self.engine.model, batch, label_token_ids(labels, self.processor))
        return logp.softmax(-1).tolist()

    def generate(self, batch: Batch, max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, **sampling) -> list[str]:
        """Generated answers; `sampling`: top_p, top_k, repetition_penalty (`generation.sampling_kwargs`)."""
        from vlmtune.infer.generation import generate_batch
        from vlmtune.infer.scoring import evaluating

        with evaluating(self.engine.model):
            return generate_batch(self.engine.model, self.processor, batch, max_new_tokens, temperature, seed,
                                  **sampling)

    def close(self) -> None:
        pass
