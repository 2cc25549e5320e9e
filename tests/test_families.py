"""The family registry: every record checked against its tiny model and its released chat template, one registry
line per family module, and no model type or transformers class named outside `vlmtune.families`."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import vlmtune.families
from helpers import ALL_ARCHS, FIXTURES, REPO, RULES_PROMPT, SYSTEM
from vlmtune.data.conversation import Message
from vlmtune.data.processor import load_processor
from vlmtune.data.template import get_template
from vlmtune.families import FAMILIES, MODEL_TYPES, chat_template_text, family_of_model, family_of_type, import_object
from vlmtune.model.load import load_model

# The chat templates the families' releases ship (tests/fixtures), by the family's name.
RELEASED = {"Qwen2-VL": [chat_template_text(family_of_type("qwen2_vl"))],
            "Qwen2.5-VL": [chat_template_text(family_of_type("qwen2_5_vl"))],
            "Qwen3-VL": [(FIXTURES / "qwen3_vl_instruct_chat_template.jinja").read_text(encoding="utf-8")],
            "Qwen3.5": [(FIXTURES / "qwen3_5" / f"{n}.jinja").read_text(encoding="utf-8")
                        for n in ("qwen3_5_think", "qwen3_5_nothink", "qwen3_6")]}


@pytest.fixture(scope="module")
def loaded(tiny_models):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_model(tiny_models(arch)).eval()
        return cache[arch]
    return get


def test_registry_has_one_line_per_family_module():
    """Each module of `vlmtune.families` (but the record and the registry) contributes its families to FAMILIES,
    and no model type or template name belongs to two families with different meanings."""
    modules = [m.name for m in pkgutil.iter_modules(vlmtune.families.__path__) if m.name != "base"]
    for name in modules:
        module = importlib.import_module(f"vlmtune.families.{name}")
        own = [v for v in vars(module).values() if isinstance(v, vlmtune.families.Family)]
        assert own and all(f in FAMILIES for f in own), name
    assert len(MODEL_TYPES) == len(set(MODEL_TYPES))
    specs = {}
    for family in FAMILIES:
        for spec in family.templates:
            assert specs.setdefault(spec.name, spec) == spec, spec.name
    assert RELEASED.keys() == {f.name for f in FAMILIES}  # a new family brings its released chat template


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_record_matches_its_tiny_model(loaded, tiny_models, arch):
    family, model = family_of_type(arch), loaded(arch)
    assert family_of_model(model) is family
    parts = family.parts(model)
    assert callable(parts.owner.get_rope_index) and callable(parts.owner.get_image_features)
    assert len(parts.language_model.layers) == model.config.text_config.num_hidden_layers
    assert parts.projector in list(parts.vision_tower.modules()) and len(parts.vision_tower.blocks) == 2
    assert model.get_submodule(family.layout.lm_head).out_features == model.config.text_config.vocab_size
    # What the vision output carries, the layer kinds, the image grid.
    vision = model.config.vision_config
    assert bool(family.deepstack_output) == bool(getattr(vision, "deepstack_visual_indexes", None))
    if family.deepstack_output:
        assert "deepstack_features" in import_object(family.deepstack_output).__dataclass_fields__
    layer_types = getattr(model.config.text_config, "layer_types", None) or []
    assert family.recurrent_state == ("linear_attention" in layer_types)
    assert (vision.patch_size, vision.spatial_merge_size) == (family.image_defaults["patch_size"],
                                                              family.image_defaults["merge_size"])
    assert family.positions == "mrope"  # the one scheme the pipeline implements (infer.scoring.prompt_positions)
    # Special tokens: single tokens of the tokenizer, and the ids the config names.
    processor = load_processor(tiny_models(arch))
    tok, tokens = processor.tokenizer, family.tokens
    for token in (tokens.turn_start, tokens.turn_end, tokens.end_of_text, tokens.vision_start, tokens.vision_end,
                  tokens.image_pad, tokens.video_pad):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert processor.image_token_id == model.config.image_token_id
    assert tok.convert_tokens_to_ids(tokens.vision_start) == model.config.vision_start_token_id


def test_fast_path_and_leaf_class_names_exist(loaded):
    """Every class a record names (fast paths proven on it, ZeRO-3 leaves) is a class of one of its tiny models: a
    misspelt name would silently switch a fast path off."""
    for family in FAMILIES:
        classes = {type(m).__name__ for arch in family.model_types for m in loaded(arch).modules()}
        for name in (*family.fast_vision_towers, *family.fast_decoder_layers, *family.fast_rope_models,
                     *family.zero3_leaf_modules):
            assert name in classes, (family.name, name)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_default_template_renders_as_the_released_one(family, tiny_models):
    """The family's default rendering of a prompt (its tiny model: the family's own chat template) equals what each
    released chat template serves — with thinking off where the release thinks by default."""
    processor = load_processor(tiny_models(family.model_types[0]))
    template = processor.template
    messages = [Message("system", SYSTEM), Message("user", RULES_PROMPT)]
    for released in RELEASED[family.name]:
        for conversation in (messages, messages[1:]):
            served = processor.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content.replace("<image>", "")} for m in conversation], tokenize=False,
                add_generation_prompt=True, chat_template=released, enable_thinking=template.enable_thinking)
            want = template.render([Message(m.role, m.content.replace("<image>", "")) for m in conversation], [],
                                   prompt="generate").text
            assert served == want


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.served_chat_template], ids=lambda f: f.name)
def test_served_chat_template_asks_what_training_rendered(family):
    """From each released template, the template an export ships gives — with no enable_thinking passed, as a
    server calls it — the generation prompt of every template and thinking setting of the family."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    messages = [Message("system", SYSTEM), Message("user", "判断以上图片是否满足要求")]
    for released in RELEASED[family.name]:
        for spec in family.templates:
            for thinking in (False, True):
                template = get_template(spec.name, thinking)
                served = family.served_chat_template(released, spec, thinking)
                text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                               tokenize=False, add_generation_prompt=True, chat_template=served)
                assert text == template.render(messages, [], prompt="generate").text, (spec.name, thinking)


def test_missing_gpu_kernels_are_one_line_on_cuda_only(monkeypatch):
    """A family whose layers want GPU kernels (Qwen3.5: flash-linear-attention, causal-conv1d) says, on a CUDA
    machine without them, in one line which to install; on a CPU nothing (the torch path is what runs there)."""
    import importlib.util

    from vlmtune.model.load import missing_kernels_note

    family = next(f for f in FAMILIES if f.kernels)
    assert missing_kernels_note(family) is None  # this machine: no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in dict(family.kernels) else
                        real(name, *a))
    note = missing_kernels_note(family)
    assert note and "\n" not in note and "vlmtune[gdn]" in note
    assert all(pip in note for _, pip in family.kernels)
    assert all(missing_kernels_note(f) is None for f in FAMILIES if not f.kernels)


def code_strings(tree: ast.AST):
    """String constants of a module that are not docstrings, with their line numbers."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_model_type_or_transformers_class_outside_the_registry():
    """House rule 1: the pipeline names no model type and no transformers model class (in code: docstrings and help
    texts may name families); it asks the record. Imports of transformers' model modules count too."""
    named = {name for f in FAMILIES for name in (*f.fast_vision_towers, *f.fast_decoder_layers, *f.fast_rope_models,
                                                  *f.zero3_leaf_modules)}
    class_name = re.compile(r"\bQwen\d\w*(Model|Layer|Config|Block|Generation|Processor\w*|Attention)\b")
    found = []
    for path in sorted((REPO / "src" / "vlmtune").rglob("*.py")):
        if "families" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, text in code_strings(tree):
            if text in MODEL_TYPES or text in named or (class_name.search(text) and len(text) < 80):
                found.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers.models."):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import ...")
    assert not found, "\n".join(found)


def test_tests_take_family_lists_from_the_registry():
    """House rule 3: no test module restates a list of model types (one named as an example is fine)."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                types = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in MODEL_TYPES]
                if len(types) >= 2:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {types}")
    assert not offenders, "\n".join(offenders)


def test_every_family_appears_in_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for family in FAMILIES:
        assert family.name in readme, family.name
        for name in family.template_names:
            assert f"`{name}`" in readme, name
    assert Path(REPO / "docs" / "config.md").read_text(encoding="utf-8").count("qwen3_5_nothink") >= 1
