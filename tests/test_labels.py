"""The one label-set rule (`vlmtune.labels`): parsed, validated and inferred the same for every command."""

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.labels import (answers_outside, infer_label_set, parse_labels, positive_first, resolve_label_set,
                            seen_label_set)

POS, NEG = "满足要求", "不满足要求"


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
