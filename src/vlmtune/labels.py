"""Label sets: the closed set of answers that label scoring chooses from and the task metrics count.

Every command and the config take a label set through :func:`parse_labels` (a YAML list, or `a,b` on a
command line, full-width commas ，too, as typed with a CJK input method) and get the same rules: at least
two labels, stripped, distinct, none empty. :func:`infer_label_set` is the one rule for finding a label
set in the data (and :func:`seen_label_set` the label set of predictions already made), and
:func:`resolve_label_set` puts them together with the positive label first (the order scores are written in).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from vlmtune.errors import VlmtuneError

MAX_INFERRED_LABELS = 8
MAX_LABEL_CHARS = 64  # a longer answer is text, not a class


def parse_labels(value: str | Sequence[str] | None, what: str = "labels") -> list[str] | None:
    """`"a,b"` or `["a", "b"]` → `["a", "b"]` (stripped, order kept); None or "" → None.

    Fewer than two labels, an empty one or the same label twice is an error naming `what` (`--labels`,
    `config.yaml: 'labels'`, ...)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        items = value.replace("，", ",").split(",")
        labels = [item.strip() for item in items if item.strip()]
    else:
        # A list item may still hold full-width commas: config.py splits a `labels=a，b` string on ASCII ones.
        labels = [part.strip() for item in value for part in str(item).split("，")]
    if len([label for label in labels if label]) < 2:
        raise VlmtuneError(f"{what} needs at least two labels (a closed set to choose from; separate them with "
                           f"commas), got {value!r}")
    if not all(labels):
        raise VlmtuneError(f"{what}: an empty label in {value!r}")
    if len(set(labels)) != len(labels):
        raise VlmtuneError(f"{what}: the same label twice in {value!r}")
    return labels


def infer_label_set(answers: Sequence[str | None], max_labels: int = MAX_INFERRED_LABELS) -> list[str] | None:
    """The closed set of answers when the data looks like classification, else None.

    Classification means: every sample has a final answer; between 2 and `max_labels` distinct
    answers (after strip); each at most 64 characters; and at least one answer repeats (five
    captions on five samples are five distinct answers, not a label set). Labels come in order of
    first appearance.
    """
    if not answers or any(a is None or not a.strip() for a in answers):
        return None
    counts = Counter(a.strip() for a in answers)
    if not 2 <= len(counts) <= max_labels or len(counts) == len(answers):
        return None
    if any(len(label) > MAX_LABEL_CHARS for label in counts):
        return None
    return list(counts)


def seen_label_set(answers: Sequence[str], positive: str) -> list[str]:
    """The label set of answers already given (a predictions file's, for its metrics when no label set is named):
    the positive label first, then the other distinct answers (stripped) in order of appearance."""
    out = [positive.strip()]
    for answer in answers:
        if answer.strip() not in out:
            out.append(answer.strip())
    return out


def positive_first(labels: Sequence[str], positive: str) -> list[str]:
    """The labels with `positive` moved to the front (when it is one of them)."""
    positive = positive.strip()
    return [positive] + [label for label in labels if label != positive] if positive in labels else list(labels)


def resolve_label_set(given: str | Sequence[str] | None, answers: Sequence[str | None], positive: str,
                      what: str = "labels") -> tuple[list[str] | None, bool]:
    """(label set or None, whether it was inferred): the given labels as given, else the answers' label set
    with the positive label first."""
    labels = parse_labels(given, what)
    if labels is not None:
        return labels, False
    inferred = infer_label_set(answers)
    return (positive_first(inferred, positive) if inferred is not None else None), True


def answers_outside(labels: Sequence[str], answers: Sequence[str | None]) -> list[str]:
    """Reference answers (stripped) that are none of the labels, sorted."""
    return sorted({(a or "").strip() for a in answers} - set(labels))
