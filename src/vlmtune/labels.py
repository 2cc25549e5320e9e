"""Label sets: the closed set of answers that label scoring chooses from and the task metrics count.

Every command and the config take a label set through :func:`parse_labels` (a YAML list, or `a,b` on a
command line, full-width commas ，too, as typed with a CJK input method) and get the same rules: at least
two labels, stripped, distinct, none empty. :func:`infer_label_set` is the one rule for finding a label
set in the data (and :func:`seen_label_set` the label set of predictions already made), and
:func:`resolve_label_set` puts them together with the positive label first (the order scores are written in).

Labels and answers are compared as :func:`normalize_answer` writes them (Unicode NFC, surrounding spaces removed):
the same word typed on another system (Hangul or accented Latin in NFD, as macOS file names give it) is the same
label; the dataset's answers are normalised so when they are read (`data/formats.py`). Answers that differ only by
width, case or trailing punctuation (`적합。` next to `적합`) are not merged but named record by record
(:func:`near_duplicates`), and :func:`label_set_notes` says at the start what makes a label set suspicious.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Sequence

from vlmtune.errors import VlmtuneError

MAX_INFERRED_LABELS = 8
MAX_LABEL_CHARS = 64  # a longer answer is text, not a class
RARE_LABEL_SHARE = 0.05  # a third (or later) label given by fewer answers than this is said at the start


def normalize_answer(text: str) -> str:
    """An answer or label as it is compared (and trained): Unicode NFC, surrounding whitespace (full-width spaces
    too) removed."""
    return unicodedata.normalize("NFC", text).strip()


def label_key(text: str) -> str:
    """What near-duplicate labels share: NFKC (full-width letters and punctuation as ASCII), case folded, without
    trailing punctuation or spaces."""
    key = unicodedata.normalize("NFKC", text).casefold().strip()
    while key and unicodedata.category(key[-1]).startswith("P"):
        key = key[:-1].rstrip()
    return key


def parse_labels(value: str | Sequence[str] | None, what: str = "labels") -> list[str] | None:
    """`"a,b"` or `["a", "b"]` → `["a", "b"]` (stripped, order kept); None or "" → None.

    Fewer than two labels, an empty one or the same label twice is an error naming `what` (`--labels`,
    `config.yaml: 'labels'`, ...)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        items = value.replace("，", ",").split(",")
        labels = [normalize_answer(item) for item in items if item.strip()]
    elif not isinstance(value, (list, tuple)) or not all(_label_like(item) for item in value):
        # `labels: 5`, `labels: {a: 1}` or `[[a, b], c]` in a YAML: not a set of answers (and no traceback)
        raise VlmtuneError(f"{what} must be labels separated by commas or a list of labels (text), got {value!r}")
    else:
        # A list item may still hold full-width commas: config.py splits a `labels=a，b` string on ASCII ones.
        labels = [normalize_answer(part) for item in value for part in str(item).split("，")]
    if len([label for label in labels if label]) < 2:
        raise VlmtuneError(f"{what} needs at least two labels (a closed set to choose from; separate them with "
                           f"commas), got {value!r}")
    if not all(labels):
        raise VlmtuneError(f"{what}: an empty label in {value!r}")
    if len(set(labels)) != len(labels):
        raise VlmtuneError(f"{what}: the same label twice in {value!r}")
    return labels


def _label_like(item: object) -> bool:
    """A list item that reads as a label: text, or a number YAML typed (`labels: [1, 0]`)."""
    return isinstance(item, (str, int, float)) and not isinstance(item, bool)


def infer_label_set(answers: Sequence[str | None], max_labels: int = MAX_INFERRED_LABELS) -> list[str] | None:
    """The closed set of answers when the data looks like classification, else None.

    Classification means: every sample has a final answer; between 2 and `max_labels` distinct
    answers (after `normalize_answer`); each at most 64 characters; and at least one answer repeats (five
    captions on five samples are five distinct answers, not a label set). Labels come in order of
    first appearance.
    """
    if not answers or any(a is None or not a.strip() for a in answers):
        return None
    counts = Counter(normalize_answer(a) for a in answers)
    if not 2 <= len(counts) <= max_labels or len(counts) == len(answers):
        return None
    if any(len(label) > MAX_LABEL_CHARS for label in counts):
        return None
    return list(counts)


def seen_label_set(answers: Sequence[str], positive: str) -> list[str]:
    """The label set of answers already given (a predictions file's, for its metrics when no label set is named):
    the positive label first, then the other distinct answers (stripped) in order of appearance."""
    out = [normalize_answer(positive)]
    for answer in map(normalize_answer, answers):
        if answer not in out:
            out.append(answer)
    return out


def positive_first(labels: Sequence[str], positive: str) -> list[str]:
    """The labels with `positive` moved to the front (when it is one of them)."""
    positive = normalize_answer(positive)
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
    """Reference answers (normalised) that are none of the labels, sorted."""
    return sorted({normalize_answer(a or "") for a in answers} - {normalize_answer(label) for label in labels})


def near_duplicates(answers: Sequence[str | None]) -> list[tuple[int, str, str]]:
    """(position, answer, its usual form) of each answer that differs from a more frequent one only by width, case
    or trailing punctuation (`label_key`): `적합。` in a dataset of `적합` — when the answers look like labels (at most
    MAX_INFERRED_LABELS of them once these are merged, each at most MAX_LABEL_CHARS). Ties: the shorter is usual."""
    counts = Counter(normalize_answer(a) for a in answers if a)
    groups: dict[str, list[str]] = {}
    for form in counts:
        groups.setdefault(label_key(form), []).append(form)
    if len(groups) > MAX_INFERRED_LABELS or any(len(form) > MAX_LABEL_CHARS for form in counts):
        return []
    usual = {}
    for forms in groups.values():
        main = max(forms, key=lambda form: (counts[form], -len(form)))
        usual.update({form: main for form in forms if form != main})
    return [(i, normalize_answer(a), usual[normalize_answer(a)]) for i, a in enumerate(answers)
            if a and normalize_answer(a) in usual]


def label_set_notes(answers: Sequence[str | None], labels: Sequence[str] | None = None,
                    names: Sequence[str] | None = None) -> list[str]:
    """What to say at the start about the answers as classes, one line each: every answer the same label (no
    negatives), more distinct label-like answers than a label set is inferred from, a third (or later) label that
    only a few records give (`names`: how to name each answer's record, e.g. `file: record 3`). `labels`: the
    label set in use, when there is one."""
    given = [normalize_answer(a) for a in answers if a and a.strip()]
    counts = Counter(given)
    if not given or any(len(form) > MAX_LABEL_CHARS for form in counts):
        return []
    if len(counts) == 1:
        only = next(iter(counts))
        return [f"every answer is {only!r} ({len(given)} records): no negatives to learn from or to count, so "
                f"precision, recall, F1 and ROC-AUC mean nothing"]
    notes = []
    if labels is None and len(counts) > MAX_INFERRED_LABELS and len(counts) < len(given):
        notes.append(f"{len(counts)} distinct answers, more than the {MAX_INFERRED_LABELS} a label set is inferred "
                     f"from: no label set (no label scoring or class metrics); name one with labels: a,b,... or "
                     f"check the answers")
    in_use = list(labels) if labels is not None else (infer_label_set(answers) or [])
    if len(in_use) >= 3:
        for label in in_use:
            k = counts.get(normalize_answer(label), 0)
            if 0 < k < RARE_LABEL_SHARE * len(given):
                where = [names[i] for i, a in enumerate(answers) if a and normalize_answer(a) == label][:3] \
                    if names is not None else []
                notes.append(f"label {label!r} is the answer of only {k} of {len(given)} records"
                             + (f" ({'; '.join(where)}{'; …' if k > 3 else ''})" if where else "")
                             + f": a class of its own among {len(in_use)}, or a mistyped answer?")
    return notes
