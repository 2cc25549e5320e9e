"""Label scoring equals one plain full forward per (sample, label), whatever the batch, on every family
(Qwen3-VL's deepstack features included), and with a reasoning template."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vlmtune.data.conversation import Conversation, Message
from vlmtune.data.encode import IGNORE_INDEX, Collator, encode, load_images
from vlmtune.data.loader import load_datasets
from vlmtune.data.processor import load_processor
from vlmtune.infer.engine import load_engine
from vlmtune.infer.last_positions import text_model
from vlmtune.infer.scoring import (encode_prompts, evaluating, label_token_ids, score_conversations,
                                   score_samples, unwrap)
from vlmtune.model.load import load_model

POS, NEG = "满足要求", "不满足要求"
# Two labels of one token each on the tiny tokenizer, plus multi-token ones of different lengths.
LABELS = [POS, NEG, "立方体 圆柱体 的", " yes", "满足"]


def naive_logprob(model, processor, conv: Conversation, label: str) -> float:
    """log P(label + <|im_end|> | prompt) from one right-padded full forward of the whole conversation."""
    conv = replace(conv, messages=list(conv.messages[:-1]) + [Message("assistant", label)])
    batch = Collator(processor)([encode(conv, processor, None)])
    labels = batch.labels[0, 1:]
    with torch.no_grad():
        logp = model(**batch.model_inputs()).logits[0, :-1].float().log_softmax(-1)
    keep = labels != IGNORE_INDEX
    return float(logp[keep].gather(-1, labels[keep][:, None]).sum())


@pytest.fixture
def base(family_model_dir):
    model = load_model(family_model_dir)
    model.eval()
    return model, load_processor(family_model_dir)


@pytest.fixture(scope="module")
def mixed_conversations(tmp_path_factory):
    from helpers import make_dataset

    data = make_dataset(tmp_path_factory.mktemp("mixed") / "data", n=5)  # 320×240 and 224×224 images
    return load_datasets("my_dataset", str(data), None).conversations


@pytest.fixture
def naive(base, mixed_conversations):
    model, processor = base
    return torch.tensor([[naive_logprob(model, processor, c, label) for label in LABELS] for c in mixed_conversations])


@pytest.mark.parametrize("batch_size", [1, 5])
def test_scoring_equals_naive_forward(base, mixed_conversations, naive, batch_size):
    """Within 1e-5 of one full forward per (sample, label): batches of prompts of mixed lengths, 2, 3 and 5 labels
    of different token lengths — padded on the right (last layer at the last prompt position only), or on the
    left for a family with linear-attention layers, whose cached state a right-padded prompt would spoil."""
    model, processor = base
    convs = mixed_conversations
    assert len({tuple(load_images(c, processor)[0].shape) for c in convs[:3]}) == 2  # sizes differ in a batch
    samples = encode_prompts(convs, processor)
    assert len({len(s) for s in samples}) > 1  # prompts of mixed lengths
    for n_labels in (2, 3, 5):
        labels, want = LABELS[:n_labels], naive[:, :n_labels]
        ids = label_token_ids(labels, processor)
        with evaluating(model):
            got = torch.cat([score_samples(model, processor, samples[i:i + batch_size], ids)
                             for i in range(0, len(samples), batch_size)])
        assert (got - want).abs().max() < 1e-5, (n_labels, (got - want).abs().max())
    assert sorted(len(i) for i in ids) != [len(ids[0])] * len(ids)  # labels of different lengths
    # ... with the prompt pass's last layer run at the last prompt position only (infer.last_positions) where the
    # family pads prompts on the right
    right = processor.score_padding == "right"
    assert (text_model(model).layers[-1].__dict__.get("_vlmtune_kept_positions") is True) == right
    probs = score_conversations(model, processor, convs, LABELS, batch_size=batch_size)
    for row, logps in zip(probs, naive):
        assert list(row) == LABELS
        assert abs(sum(row.values()) - 1) < 1e-6
        assert torch.allclose(torch.tensor(list(row.values())), logps.softmax(-1), atol=1e-5)


def test_right_padded_batch_of_a_recurrent_family_is_moved_left(tiny_models, mixed_conversations):
    """A caller that pads right anyway gets the exact scores on Qwen3.5 (its state would have run over the pads):
    label_logprobs moves the rows to the left first."""
    from vlmtune.families import FAMILIES
    from vlmtune.infer.scoring import label_logprobs

    arch = next(f.model_types[0] for f in FAMILIES if f.recurrent_state)
    model = load_model(tiny_models(arch)).eval()
    processor = load_processor(tiny_models(arch))
    samples = encode_prompts(mixed_conversations, processor)
    ids = label_token_ids(LABELS[:3], processor)
    with evaluating(model):
        right = label_logprobs(model, Collator(processor, "right", raw_images=True)(samples), ids)
        left = label_logprobs(model, Collator(processor, "left", raw_images=True)(samples), ids)
    assert (right - left).abs().max() < 1e-5


@pytest.mark.parametrize("thinking", [False, True])
def test_scoring_with_the_reasoning_template(tiny_models, mixed_conversations, thinking):
    """qwen3_vl: scoring conditions on the empty thought; without thinking that is the trained prompt, so the
    log-probs equal the naive forward's; with thinking the thought is part of every answer, a term common to
    all labels, so the probabilities are the same."""
    model_dir = tiny_models("qwen3_vl")
    model = load_model(model_dir).eval()
    without = load_processor(model_dir, template="qwen3_vl", enable_thinking=False)
    processor = load_processor(model_dir, template="qwen3_vl", enable_thinking=thinking)
    convs = mixed_conversations[:3]
    want = torch.tensor([[naive_logprob(model, without, c, label) for label in LABELS[:3]] for c in convs])
    with evaluating(model):
        got = score_samples(model, processor, encode_prompts(convs, processor), label_token_ids(LABELS[:3], processor))
    assert (got - want).abs().max() < 1e-4
    probs = score_conversations(model, processor, convs, LABELS[:3])
    assert torch.allclose(torch.tensor([list(p.values()) for p in probs]), want.softmax(-1), atol=1e-5)


def test_scoring_a_peft_model_in_train_mode(tiny_model_dir, label_adapter, rules_dir):
    """What the trainer does at each evaluation: a trainable peft model; its mode comes back unchanged."""
    from peft import PeftModel

    engine = load_engine(str(tiny_model_dir), str(label_adapter), log=lambda *_: None)
    model, processor = engine.model, engine.processor
    assert isinstance(model, PeftModel)
    model.train()
    unwrap(model).model.visual.eval()  # a trainer may keep frozen parts in eval mode: that must survive too
    modes = [m.training for m in model.modules()]
    convs = load_datasets("rules", str(rules_dir), 6).conversations
    images = [load_images(c, processor) for c in convs]
    probs = score_conversations(model, processor, convs, [POS, NEG], batch_size=4, images=images)
    assert [m.training for m in model.modules()] == modes and model.training and False in modes
    model.eval()
    want = torch.tensor([[naive_logprob(model, processor, c, label) for label in (POS, NEG)] for c in convs])
    got = torch.tensor([[p[POS], p[NEG]] for p in probs])
    assert torch.allclose(got, want.softmax(-1), atol=1e-5)
    # The adapter learned the rule: the answer each prompt asks for is the likelier one.
    assert [max(p, key=p.get) for p in probs] == [c.answer for c in convs]


def test_label_tokens_are_whole_sequences(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    pos, neg = label_token_ids([POS, NEG], processor)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert pos[-1] == im_end and neg[-1] == im_end
    assert pos != neg
    with pytest.raises(ValueError):
        label_token_ids([POS, POS], processor)


def test_merged_adapter_scores_as_the_unmerged_one(tiny_model_dir, label_adapter, rules_dir):
    """`vlmtune predict` merges the adapter into the weights (load_engine(merge_adapter=True))."""
    convs = load_datasets("rules", str(rules_dir), 6).conversations
    probs = []
    for merge in (False, True):
        engine = load_engine(str(tiny_model_dir), str(label_adapter), merge_adapter=merge, log=lambda *_: None)
        probs.append(torch.tensor([[p[POS], p[NEG]] for p in score_conversations(engine.model, engine.processor,
                                                                                   convs, [POS, NEG])]))
    assert torch.allclose(probs[0], probs[1], atol=1e-5)
