"""The model families vlmtune supports: the registry, one line per family, and the lookups.

The pipeline (data encoding, training, scoring, generation, serving, export) is written once, against
transformers' own model classes; what it must know about a family is that family's record (`base.Family`): its
model types, chat templates and thinking rules, special tokens, image defaults, where the language model, vision
tower and projector are, what the vision output carries, the position scheme, what its cache needs, which fast
paths are proven on it, and its tiny config. A new family is one module here and one line in `FAMILIES`;
tests/test_families.py checks every record against its tiny model and its released chat template, and the tests
take their family lists from here.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.families import qwen2_vl, qwen3_5, qwen3_vl
from vlmtune.families.base import CHATML, Family, Layout, Parts, SpecialTokens, TemplateSpec  # noqa: F401
from vlmtune.files import read_json_object

FAMILIES: tuple[Family, ...] = (
    qwen2_vl.QWEN2_VL_FAMILY,
    qwen2_vl.QWEN2_5_VL_FAMILY,
    qwen3_vl.FAMILY,
    qwen3_5.FAMILY,
)
MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)
TINY_DEFAULT = qwen2_vl.QWEN2_5_VL_FAMILY.model_types[0]  # `vlmtune tiny-model`'s default: the seed user's family
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "chat_templates"


def family_of_type(model_type: str | None, where: str = "config.json") -> Family:
    """The family of a `model_type`, or a one-line error naming the supported ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise VlmtuneError(f"{where}: model_type '{model_type}' is not supported "
                       f"(supported: {', '.join(MODEL_TYPES)})")


def family_of_dir(model_dir: str | Path) -> Family:
    """The family of a model directory, from its config.json read as JSON (no transformers import)."""
    path = Path(model_dir) / "config.json"
    return family_of_type(read_json_object(path).get("model_type"), str(path))


def family_of_model(model) -> Family | None:
    """The family of a loaded transformers model (not wrapped), None for an unknown one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def parts_of(core) -> Parts:
    """The owner, language model, vision tower and projector of a loaded model (not wrapped), at its family's
    layout; a model of no known family fails here, in one line."""
    family = family_of_model(core)
    if family is None:
        raise VlmtuneError(f"{type(core).__name__}: not a model of a supported family ({', '.join(MODEL_TYPES)})")
    return family.parts(core)


def chat_template_text(family: Family) -> str:
    """The family's own chat template (Jinja), as its instruct releases ship it."""
    return (ASSETS / family.chat_template).read_text(encoding="utf-8")


def template_specs() -> dict[str, TemplateSpec]:
    """Every template name (aliases included) → its spec, over all families."""
    specs = {spec.name: spec for family in FAMILIES for spec in family.templates}
    aliases = {alias: specs[name] for family in FAMILIES for alias, name in family.template_aliases.items()}
    return {**specs, **aliases}


def import_object(path: str):
    """`package.module.Name` → the object."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
