"""Synthetic compliance scenes: shaded cubes, cylinders, rings, star badges and lamps on a floor,
with corner watermarks, a Chinese rules prompt, and ground-truth labels.

Public API:
    generate(n, out_dir, seed, preset=..., rules=..., name=..., image_size=...) -> Path of <name>.json
    caption(scene, lang="zh") -> str     objects per kind, stars in rings, lamp position, foreign count
    RULES                                the seven rules (number, key, Chinese text)
    sample_scene / render / evaluate / build_prompt for building blocks.
"""

from vlmtune.synth.dataset import generate, resolve_rules
from vlmtune.synth.draw import render
from vlmtune.synth.rules import (
    NEGATIVE,
    POSITIVE,
    PRESETS,
    RULES,
    SYSTEM_PROMPT,
    Rule,
    build_prompt,
    evaluate,
    label,
)
from vlmtune.synth.scene import KINDS, Scene, SceneObject, Watermarks, caption, sample_scene

__all__ = [
    "generate", "resolve_rules", "render", "caption", "sample_scene", "evaluate", "label", "build_prompt",
    "RULES", "Rule", "PRESETS", "SYSTEM_PROMPT", "POSITIVE", "NEGATIVE", "KINDS",
    "Scene", "SceneObject", "Watermarks",
]
