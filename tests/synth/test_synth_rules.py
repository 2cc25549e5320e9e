"""Labels, presets, rule selection and the sampler's contract (break exactly what is asked)."""

from __future__ import annotations

import random
import re

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.synth import RULES, build_prompt, caption, evaluate, generate, resolve_rules, sample_scene
from vlmtune.synth.rules import NEGATIVE, POSITIVE, RULE_KEYS, SYSTEM_PROMPT

PROMPT_HEAD = "<image>判断以上图片是否满足要求:\n"
PROMPT_TAIL = '\n请只输出如下格式:"满足要求", 或 "不满足要求"。'


def listed_rules(prompt: str) -> list[str]:
    """The rule texts of a prompt, checking they are numbered 1..k in order."""
    assert prompt.startswith(PROMPT_HEAD) and prompt.endswith(PROMPT_TAIL)
    lines = prompt[len(PROMPT_HEAD):-len(PROMPT_TAIL)].split("\n")
    for i, line in enumerate(lines, start=1):
        assert re.match(rf"{i}\. \S", line), line
    return [line.split(". ", 1)[1] for line in lines]


def test_records_and_balance(full_set):
    _, records, truths = full_set
    assert len(records) == len(truths) == 60
    labels = [r["messages"][2]["content"] for r in records]
    assert labels.count(POSITIVE) == labels.count(NEGATIVE) == 30  # default break_prob 0.5
    for r, t in zip(records, truths):
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert r["messages"][0]["content"] == SYSTEM_PROMPT
        assert r["images"] == [t["image"]] and t["image"].startswith("images/")
        assert r["messages"][2]["content"] == t["label"]
        assert listed_rules(r["messages"][1]["content"]) == [rule.text for rule in RULES]
        assert r["messages"][1]["content"].count("<image>") == 1
    # Every rule is broken somewhere, and negatives are not all single-rule.
    broken = [set(t["broken_rules"]) for t in truths]
    assert set().union(*broken) == set(RULE_KEYS)
    assert any(len(b) > 1 for b in broken)


def test_easy_preset_lists_two_rules_and_ignores_the_rest(tmp_path, load):
    records, truths = load(generate(40, tmp_path, seed=3, preset="easy", name="easy", image_size=128))
    for r, t in zip(records, truths):
        assert listed_rules(r["messages"][1]["content"]) == [RULES[0].text, RULES[1].text]
        assert t["active_rule_numbers"] == [1, 2]
        held = t["rules_held"]
        assert (t["label"] == POSITIVE) == (held["only_known_kinds"] and held["stars_in_rings"])
    # Inactive rules get broken too, without making the sample negative.
    assert any(t["label"] == POSITIVE and not all(t["rules_held"].values()) for t in truths)


def test_explicit_rules_are_renumbered(tmp_path, load):
    records, truths = load(generate(60, tmp_path, seed=4, rules="5,1,2", name="sub", image_size=128))
    assert listed_rules(records[0]["messages"][1]["content"]) == [RULES[0].text, RULES[1].text, RULES[4].text]
    active = {"only_known_kinds", "stars_in_rings", "sum_watermark"}
    for t in truths:
        assert set(t["broken_rules"]) <= active
        assert (t["label"] == NEGATIVE) == bool(t["broken_rules"])
    assert {k for t in truths for k in t["broken_rules"]} == active


@pytest.mark.parametrize("prob,expected", [(0.0, {POSITIVE}), (1.0, {NEGATIVE})])
def test_break_prob_extremes(tmp_path, load, prob, expected):
    _, truths = load(generate(30, tmp_path, seed=5, break_prob=prob, image_size=128))
    assert {t["label"] for t in truths} == expected


@pytest.mark.parametrize("key", RULE_KEYS)
def test_sampler_breaks_exactly_what_is_asked(key):
    for i in range(40):
        scene = sample_scene(random.Random(i), 224, {key})
        assert {k for k, ok in evaluate(scene).items() if not ok} == {key}
    for i in range(40):
        assert all(evaluate(sample_scene(random.Random(i), 224, set())).values())


def test_evaluate_catches_hand_made_violations():
    scene = sample_scene(random.Random(0), 224, set())
    assert all(evaluate(scene).values())
    scene.watermarks.sum += 1
    assert not evaluate(scene)["sum_watermark"]
    scene.watermarks.sum -= 1
    scene.watermarks.counts["ring"] += 1
    assert not evaluate(scene)["counts_watermark"]


def test_resolve_rules():
    assert resolve_rules() == (1, 2, 3, 4, 5, 6, 7)
    assert resolve_rules("easy") == (1, 2)
    assert resolve_rules("easy", "3, 1,3") == (1, 3)
    for bad in ("9", "0,1", "a", ""):
        with pytest.raises(VlmtuneError):
            resolve_rules(rules=bad)
    with pytest.raises(VlmtuneError):
        resolve_rules("hard")


def test_prompt_and_caption(full_set):
    assert build_prompt([2]) == PROMPT_HEAD + "1. " + RULES[1].text + PROMPT_TAIL
    assert len(RULES) == 7 and all(r.text for r in RULES)
    from vlmtune.synth.scene import Scene
    for t in full_set[2][:10]:
        scene = Scene.from_dict(t)
        zh, en = caption(scene), caption(scene, "en")
        assert zh == t["caption"]
        c = t["counts"]
        assert f"立方体{c['cube']} " in zh and f"台灯{c['lamp']} " in zh and f"其他物体{t['foreign']}" in zh
        assert f"lamp:{t['lamp_position']}" in en and f"ring{c['ring']} " in en
