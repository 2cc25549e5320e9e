"""The one label-set rule (`vlmtune.labels`): parsed, validated and inferred the same for every command."""

import unicodedata

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune import labels as label_rules
from vlmtune.labels import (answers_outside, infer_label_set, parse_labels, positive_first, resolve_label_set,
                            seen_label_set)

POS, NEG = "满足要求", "不满足要求"
FIT = "적합"  # Hangul, NFC: two code points; in NFD (as macOS and some IMEs write it) five
FIT_NFD = unicodedata.normalize("NFD", FIT)


def test_parse_labels_accepts_strings_lists_and_full_width_commas():
    assert parse_labels(f"{POS},{NEG}") == [POS, NEG]
    assert parse_labels(f" {POS} ，{NEG} ") == [POS, NEG]
    assert parse_labels([f" {POS}", NEG]) == [POS, NEG]
    assert parse_labels([f"{POS}，{NEG}"]) == [POS, NEG]  # config.py split `labels=a，b` on ASCII commas only
    assert parse_labels(None) is None and parse_labels("  ") is None


@pytest.mark.parametrize("value", [POS, f"{POS},{POS}", [POS, ""], [POS, f" {POS} "], f"{POS},{NEG},{POS}"])
def test_parse_labels_refuses_what_is_not_a_closed_set(value):
    with pytest.raises(VlmtuneError, match="--labels"):
        parse_labels(value, "--labels")


@pytest.mark.parametrize("value", [5, 1.5, True, {"a": 1, "b": 2}, [["a", "b"], "c"], [None, "a"], [True, False]])
def test_parse_labels_refuses_a_yaml_value_that_is_no_label_list_in_one_line(value):
    """`labels: 5` in a serving YAML was a TypeError; `labels: {a: 1, b: 2}` silently its keys, `[null, a]` 'None'."""
    with pytest.raises(VlmtuneError, match="serve.yaml: labels must be labels separated by commas or a list"):
        parse_labels(value, "serve.yaml: labels")
    assert parse_labels([1, 0]) == ["1", "0"]  # numbers YAML typed are labels still


def test_infer_label_set():
    assert infer_label_set([NEG, POS, POS, " 不满足要求 "]) == [NEG, POS]
    assert infer_label_set([POS, POS]) is None  # one label is not a choice
    assert infer_label_set(["a cube", "two rings", "a lamp"]) is None  # all distinct: free text
    assert infer_label_set([str(i % 9) for i in range(40)]) is None  # more than 8 labels
    assert infer_label_set([str(i % 9) for i in range(40)], max_labels=9) is not None
    assert infer_label_set([POS, None, POS]) is None


def test_resolve_puts_the_positive_label_first_only_when_inferred():
    assert resolve_label_set(None, [NEG, POS, POS], POS) == ([POS, NEG], True)
    assert resolve_label_set(f"{NEG},{POS}", [NEG, POS, POS], POS) == ([NEG, POS], False)
    assert resolve_label_set(None, ["a", "b", "c"], POS) == (None, True)
    assert positive_first(["a", "b"], "z") == ["a", "b"]
    assert answers_outside([POS, NEG], [POS, " x ", None]) == ["", "x"]


def test_seen_label_set_of_predictions_already_made():
    assert seen_label_set([NEG, " 其他 ", NEG], POS) == [POS, NEG, "其他"]  # the positive label even when unseen


def test_labels_typed_on_another_system_are_the_same_label():
    """NFC vs NFD and surrounding (full-width) spaces: one label everywhere labels and answers are compared."""
    assert FIT != FIT_NFD
    assert parse_labels(f"{FIT_NFD},부적합") == [FIT, "부적합"]
    with pytest.raises(VlmtuneError, match="the same label twice"):
        parse_labels([FIT, FIT_NFD])
    assert infer_label_set([FIT, FIT_NFD, "부적합", "부적합\u3000", FIT]) == [FIT, "부적합"]
    assert answers_outside([FIT_NFD, "부적합"], [FIT, " 부적합 "]) == []
    assert seen_label_set([FIT_NFD, "부적합"], FIT) == [FIT, "부적합"]
    assert positive_first(["부적합", FIT], FIT_NFD) == [FIT, "부적합"]


def test_near_duplicate_answers_are_named_by_position():
    answers = [FIT, FIT, f"{FIT}。", "부적합", "부적합", "Yes", "yes."]
    assert label_rules.near_duplicates(answers) == [(2, f"{FIT}。", FIT), (6, "yes.", "Yes")]
    captions = [f"caption {i}." for i in range(20)] + ["caption 1"]
    assert label_rules.near_duplicates(captions) == []  # more forms than a label set: free text, left alone


def test_label_set_notes_say_what_the_metrics_would_hide():
    names = [f"rules.json: record {i}" for i in range(62)]
    assert "no negatives" in label_rules.label_set_notes([POS] * 6)[0]
    assert "9 distinct answers" in label_rules.label_set_notes([str(i % 9) for i in range(40)])[0]
    [rare] = label_rules.label_set_notes([POS] * 30 + [NEG] * 30 + ["其他"] * 2, names=names)
    assert "'其他'" in rare and "2 of 62" in rare and "rules.json: record 60; rules.json: record 61" in rare
    assert label_rules.label_set_notes([POS] * 30 + [NEG] * 30) == []
    assert label_rules.label_set_notes([f"caption {i}" for i in range(20)]) == []
