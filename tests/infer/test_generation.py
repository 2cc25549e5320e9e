"""Generation: greedy regardless of the model's generation_config, batch-independent, and in
agreement with label scoring wherever it produces a label (on every family)."""

from __future__ import annotations

import pytest

from helpers import ALL_ARCHS
from vlmtune.data.loader import load_datasets
from vlmtune.infer.engine import load_engine
from vlmtune.infer.generation import generate_conversations
from vlmtune.infer.scoring import score_conversations

POS, NEG = "满足要求", "不满足要求"


@pytest.fixture(scope="module")
def engine(tiny_model_dir, label_adapter):
    return load_engine(str(tiny_model_dir), str(label_adapter), log=lambda *_: None)


@pytest.fixture(scope="module")
def conversations(rules_dir):
    return load_datasets("rules", str(rules_dir), None).conversations


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_score_mode_agrees_with_greedy_generation(tiny_models, label_adapters, arch, conversations):
    engine = load_engine(str(tiny_models(arch)), str(label_adapters(arch)), log=lambda *_: None)
    texts = generate_conversations(engine.model, engine.processor, conversations, batch_size=8, max_new_tokens=6)
    probs = score_conversations(engine.model, engine.processor, conversations, [POS, NEG], batch_size=8)
    scored = [max(p, key=p.get) for p in probs]
    valid = [(text, label) for text, label in zip(texts, scored) if text in (POS, NEG)]
    assert len(valid) >= len(conversations) // 2, texts  # the adapter answers with labels
    assert {text for text, _ in valid} == {POS, NEG}  # both labels occur: agreement is not trivial
    assert all(text == label for text, label in valid), list(zip(texts, scored))


def test_reasoning_template_answers_after_the_thought(tiny_models, label_adapters, conversations):
    """qwen3_vl with enable_thinking: the adapter learns to open with the empty thought, generation writes it
    first, and the answer (what is compared with the label) is the text after it; scoring agrees."""
    from vlmtune.infer.scoring import evaluating, to_model
    from vlmtune.model.compat import image_inputs, unwrap

    model_dir = tiny_models("qwen3_vl")
    adapter = label_adapters("qwen3_vl", template="qwen3_vl", steps=60)
    engine = load_engine(str(model_dir), str(adapter), log=lambda *_: None)  # the adapter's template
    assert (engine.processor.template.name, engine.processor.template.enable_thinking) == ("qwen3_vl", True)
    convs = conversations[:8]
    texts = generate_conversations(engine.model, engine.processor, convs, batch_size=8, max_new_tokens=12)
    assert texts == [c.answer for c in convs]
    probs = score_conversations(engine.model, engine.processor, convs, [POS, NEG], batch_size=8)
    assert [max(p, key=p.get) for p in probs] == texts
    # The thought really was generated (and removed from the answer), not skipped.
    from vlmtune.data.encode import Collator
    from vlmtune.infer.generation import sampling_kwargs
    from vlmtune.infer.scoring import encode_prompts

    processor = engine.processor
    samples = encode_prompts(convs[:1], processor, prompt="generate")
    with evaluating(engine.model):
        core = unwrap(engine.model)
        batch = to_model(Collator(processor, padding_side="left", raw_images=True)(samples), core)
        with image_inputs(core, batch) as inputs:
            out = core.generate(**inputs, **sampling_kwargs(12, 0.0), eos_token_id=processor.stop_token_ids(),
                                pad_token_id=processor.pad_token_id)
    raw = processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert raw.startswith("<think>\n\n</think>\n\n") and raw.endswith(convs[0].answer)


def test_greedy_ignores_the_models_sampling_defaults(engine, conversations):
    """Qwen's generation_config.json ships repetition_penalty 1.05, top_k 1, temperature 0.1."""
    convs = conversations[:6]
    clean = generate_conversations(engine.model, engine.processor, convs, batch_size=6, max_new_tokens=6)
    config = engine.model.generation_config
    saved = config.to_dict()
    try:
        config.update(do_sample=True, temperature=5.0, top_k=3, repetition_penalty=50.0, no_repeat_ngram_size=1)
        hostile = generate_conversations(engine.model, engine.processor, convs, batch_size=6, max_new_tokens=6)
    finally:
        config.update(**saved)
    assert hostile == clean


def test_batched_left_padding_matches_one_by_one(tiny_model_dir, conversations):
    """The random base model (long, noisy answers): batch 4 with left padding == batch 1."""
    base = load_engine(str(tiny_model_dir), None, log=lambda *_: None)
    convs = conversations[:4]  # two image sizes: rows have different lengths
    one = generate_conversations(base.model, base.processor, convs, batch_size=1, max_new_tokens=8)
    four = generate_conversations(base.model, base.processor, convs, batch_size=4, max_new_tokens=8)
    assert one == four
    assert any(text not in (POS, NEG) for text in one)  # untrained: free text, stopped by max_new_tokens


def test_sampling_is_seeded(engine, conversations):
    convs = conversations[:4]
    kwargs = dict(batch_size=4, max_new_tokens=6, temperature=1.5)
    first = generate_conversations(engine.model, engine.processor, convs, seed=7, **kwargs)
    again = generate_conversations(engine.model, engine.processor, convs, seed=7, **kwargs)
    assert first == again


def test_resumed_sampling_run_samples_as_a_fresh_one(tiny_model_dir, conversations):
    """`vlmtune predict` seeds each batch by its first sample's index: a resumed run gets the same rows."""
    from vlmtune.infer.runner import TransformersPredictor, predict_batches

    predictor = TransformersPredictor(load_engine(str(tiny_model_dir), None, log=lambda *_: None))  # random: varied
    kwargs = dict(mode="generate", labels=None, batch_size=3, max_new_tokens=6, temperature=1.5, seed=11)
    fresh = [r for _, rows in predict_batches(predictor, conversations[:9], **kwargs) for r in rows]
    resumed = [r for _, rows in predict_batches(predictor, conversations[3:9], first_index=3, **kwargs) for r in rows]
    assert resumed == fresh[3:]
    assert [r["id"] for r in fresh] == [c.id for c in conversations[:9]]
    other = [r for _, rows in predict_batches(predictor, conversations[3:9], **kwargs) for r in rows]
    assert other != resumed  # the seed matters: without first_index the rows differ
