"""Task metrics for rule-compliance answers, and the loader of prediction JSONL files.

Pure functions (numpy at most, never torch): `vlmtune eval`, the report, the trainer at every eval
step and the checkpoint sweep all call :func:`compute_metrics`, so the numbers agree everywhere.

Rules that matter here:

* Answers are compared by **exact equality after `labels.normalize_answer`** (NFC, stripped) — never by substring:
  "满足要求" is a substring of "不满足要求", so ``"满足要求" in predict`` counts every rejection as compliant.
* An answer equal to no label (``"满足"``, ``"不满足要求。"``) is *invalid* and always wrong: for a
  positive it is a false negative; for a negative it is not a true negative (specificity counts it
  as a miss) but not a false positive either (it did not say the positive label).
* Undefined values (precision with no predicted positive, AUC with one class, ...) are ``None``
  (JSON ``null``), never NaN.
* Score metrics treat the positive label against all the others: ``score >= t`` means positive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmtune.errors import VlmtuneError
from vlmtune.files import read_bytes, refuse_input_as_output, write_atomic
from vlmtune.labels import normalize_answer, seen_label_set

POSITIVE = "满足要求"
INVALID = "invalid"  # name of the confusion-matrix column for answers equal to no label
# Keys present only when positive_scores were given to compute_metrics.
SCORE_KEYS = ("roc_auc", "pr_auc", "best_threshold", "best_threshold_accuracy",
              "best_threshold_precision", "best_threshold_recall", "best_threshold_f1")


def _ratio(num: float, den: float) -> float | None:
    """num/den, or None when the denominator is 0 (an undefined metric, not NaN)."""
    return None if den == 0 else float(num) / float(den)


def compute_metrics(labels: Sequence[str], predicts: Sequence[str], positive: str = POSITIVE,
                    label_set: Sequence[str] | None = None,
                    positive_scores: Sequence[float] | None = None) -> dict[str, Any]:
    """Metrics of answers ``predicts`` against references ``labels`` for the label ``positive``.

    Returns a JSON-ready dict with the keys ``n, positive, labels, n_positive, n_negative, tp, fp,
    fn, tn, accuracy, precision, recall, f1, specificity, n_invalid, invalid_rate,
    confusion_matrix`` (``{"rows": labels, "columns": labels + ["invalid"], "matrix": [[int]]}``,
    rows = true label, columns = predicted), plus :data:`SCORE_KEYS` when ``positive_scores``
    (P(positive) per example) are given. Raises ValueError for mismatched lengths, a reference
    label outside ``label_set``, or a ``label_set`` without ``positive``.
    """
    if len(labels) != len(predicts):
        raise ValueError(f"{len(labels)} labels but {len(predicts)} predicts")
    positive = normalize_answer(positive)
    truth = [normalize_answer(label) for label in labels]
    answers = [normalize_answer(predict) for predict in predicts]
    if label_set is None:
        label_set = seen_label_set(truth, positive)
    else:
        label_set = list(dict.fromkeys(normalize_answer(label) for label in label_set))
        if positive not in label_set:
            raise ValueError(f"positive label {positive!r} is not in the label set {label_set}")
        for i, label in enumerate(truth):
            if label not in label_set:
                raise ValueError(f"label {label!r} of example {i} is not in the label set {label_set}")

    index = {label: i for i, label in enumerate(label_set)}
    matrix = [[0] * (len(label_set) + 1) for _ in label_set]
    for label, answer in zip(truth, answers):
        matrix[index[label]][index.get(answer, len(label_set))] += 1

    n = len(truth)
    n_positive = sum(label == positive for label in truth)
    correct = sum(label == answer for label, answer in zip(truth, answers))
    tp = sum(label == positive and answer == positive for label, answer in zip(truth, answers))
    fp = sum(label != positive and answer == positive for label, answer in zip(truth, answers))
    tn = correct - tp  # negatives answered with their own label
    n_invalid = sum(answer not in index for answer in answers)
    out: dict[str, Any] = {
        "n": n,
        "positive": positive,
        "labels": list(label_set),
        "n_positive": n_positive,
        "n_negative": n - n_positive,
        "tp": tp,
        "fp": fp,
        "fn": n_positive - tp,
        "tn": tn,
        "accuracy": _ratio(correct, n),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, n_positive),
        # 2tp / (2tp + fp + fn): defined (possibly 0) whenever there is a positive to find or to claim.
        "f1": _ratio(2 * tp, tp + fp + n_positive),
        "specificity": _ratio(tn, n - n_positive),
        "n_invalid": n_invalid,
        "invalid_rate": _ratio(n_invalid, n),
        "confusion_matrix": {"rows": list(label_set), "columns": list(label_set) + [INVALID],
                             "matrix": matrix},
    }
    if positive_scores is not None:
        if len(positive_scores) != n:
            raise ValueError(f"{n} labels but {len(positive_scores)} positive_scores")
        out.update(score_metrics([label == positive for label in truth], positive_scores))
    return out


def score_metrics(is_positive: Sequence[bool], scores: Sequence[float]) -> dict[str, float | None]:
    """ROC-AUC, PR-AUC (average precision) and the best-F1 threshold of P(positive) scores.

    The best threshold is the score value ``t`` (rule: ``score >= t`` is positive) with the highest
    F1; ties go to the higher accuracy, then to the higher threshold (fewer positives claimed).
    """
    y = np.asarray(is_positive, dtype=bool)
    s = np.asarray(scores, dtype=float)
    out: dict[str, float | None] = dict.fromkeys(SCORE_KEYS)
    out["roc_auc"] = roc_auc(y, s)
    n_pos = int(y.sum())
    if n_pos == 0:  # nothing to find: PR-AUC and F1 are undefined at every threshold
        return out
    tp, fp, thresholds = _cumulative_counts(y, s)
    out["pr_auc"] = float(np.sum(np.diff(tp, prepend=0) / n_pos * tp / (tp + fp)))
    f1 = 2 * tp / (tp + fp + n_pos)
    accuracy = (tp + (len(y) - n_pos - fp)) / len(y)
    # lexsort: last key is primary. Max f1, then max accuracy, then max threshold.
    best = np.lexsort((thresholds, accuracy, f1))[-1]
    out["best_threshold"] = float(thresholds[best])
    out["best_threshold_accuracy"] = float(accuracy[best])
    out["best_threshold_precision"] = float(tp[best] / (tp[best] + fp[best]))
    out["best_threshold_recall"] = float(tp[best] / n_pos)
    out["best_threshold_f1"] = float(f1[best])
    return out


def roc_auc(is_positive: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve by the Mann-Whitney rank formula (tied scores count one half).

    None when either class is absent.
    """
    y = np.asarray(is_positive, dtype=bool)
    s = np.asarray(scores, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Average (1-based) ranks, ties sharing the mean of the ranks they span.
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=float)
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, fp, thresholds) for each distinct score as threshold, highest first (``score >= t``)."""
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    last_of_group = np.r_[ss[1:] != ss[:-1], True]  # ties are cut together, never split
    tp = np.cumsum(ys)[last_of_group].astype(float)
    fp = np.cumsum(~ys)[last_of_group].astype(float)
    return tp, fp, ss[last_of_group]


def roc_curve(is_positive: Sequence[bool], scores: Sequence[float]) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates) from (0, 0) to (1, 1); empty when one class is absent."""
    y = np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return [], []
    tp, fp, _ = _cumulative_counts(y, np.asarray(scores, dtype=float))
    return [0.0] + (fp / n_neg).tolist(), [0.0] + (tp / n_pos).tolist()


def pr_curve(is_positive: Sequence[bool], scores: Sequence[float]) -> tuple[list[float], list[float], list[float]]:
    """(recalls, precisions, thresholds), one point per distinct score, highest threshold first."""
    y = np.asarray(is_positive, dtype=bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return [], [], []
    tp, fp, thresholds = _cumulative_counts(y, np.asarray(scores, dtype=float))
    return (tp / n_pos).tolist(), (tp / (tp + fp)).tolist(), thresholds.tolist()


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric, defined entries of a metrics dict (for TensorBoard / trainer logs)."""
    return {prefix + key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


# ---------------------------------------------------------------------------------------------
# Prediction JSONL


def _at(path: Path, line: int, field: str | None = None) -> str:
    """``file: line 3: field 'predict'`` — where an input error is."""
    return f"{path}: line {line}" + (f": field '{field}'" if field else "")


def _check_record(obj: Any, path: Path, line: int) -> dict[str, Any]:
    """Validate one parsed JSONL object and return it normalised (see :func:`load_predictions`)."""
    if not isinstance(obj, dict):
        raise VlmtuneError(f"{_at(path, line)}: expected a JSON object, got {type(obj).__name__}")
    record = dict(obj)
    for field in ("predict", "label"):
        if field not in record:
            raise VlmtuneError(f"{_at(path, line, field)}: missing")
        if not isinstance(record[field], str):
            raise VlmtuneError(f"{_at(path, line, field)}: must be a string, got {type(record[field]).__name__}")
    if not record["label"].strip():
        raise VlmtuneError(f"{_at(path, line, 'label')}: empty")
    rid = record.get("id")
    if rid is None:
        record["id"] = f"line-{line}"
    elif isinstance(rid, (str, int)) and not isinstance(rid, bool):
        record["id"] = str(rid)
    else:
        raise VlmtuneError(f"{_at(path, line, 'id')}: must be a string, got {type(rid).__name__}")
    images = record.get("images")
    if images is None:
        record["images"] = []
    elif isinstance(images, str):
        record["images"] = [images]
    elif not (isinstance(images, list) and all(isinstance(p, str) for p in images)):
        raise VlmtuneError(f"{_at(path, line, 'images')}: must be a list of paths")
    if not isinstance(record.get("prompt", ""), str):
        raise VlmtuneError(f"{_at(path, line, 'prompt')}: must be a string")
    scores = record.get("scores")
    if scores is None:
        record.pop("scores", None)
    elif not isinstance(scores, dict):
        raise VlmtuneError(f"{_at(path, line, 'scores')}: must be an object label -> probability, "
                           f"got {type(scores).__name__}")
    else:
        for key, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise VlmtuneError(f"{_at(path, line, 'scores')}: value for {key!r} must be a probability in "
                                   f"[0, 1], got {value!r}")
        stripped = [normalize_answer(str(key)) for key in scores]
        if len(set(stripped)) != len(stripped):
            raise VlmtuneError(f"{_at(path, line, 'scores')}: the same label twice ({sorted(scores)})")
    record["_line"] = line
    return record


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a prediction JSONL written by `vlmtune predict`.

    Each returned record has ``id`` (str; ``line-N`` when absent), ``images`` (list, paths as
    written), ``predict``, ``label``, optional ``prompt`` and ``scores``, and ``_line`` (1-based
    line number, for error messages). Blank lines are skipped. Any problem raises VlmtuneError
    naming the file, the line and the field.
    """
    path = Path(path)
    raw = read_bytes(path)
    records = []
    for line, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise VlmtuneError(f"{_at(path, line)}: not valid UTF-8") from None
        if line == 1:
            text = text.lstrip("\ufeff")  # a BOM from editors on Windows
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VlmtuneError(f"{_at(path, line)}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise VlmtuneError(f"{_at(path, line)}: JSON nested too deeply") from None
        records.append(_check_record(obj, path, line))
    if not records:
        raise VlmtuneError(f"{path}: no predictions (the file is empty)")
    return records


def positive_scores_of(records: Sequence[dict[str, Any]], positive: str, path: str | Path) -> list[float] | None:
    """P(positive) for every record, or None when no record has ``scores`` (generate mode).

    A file where only some records have scores, or a scores object without the positive label,
    is an error (it would silently bias the AUC).
    """
    have = [("scores" in r) for r in records]
    if not any(have):
        return None
    out = []
    for record in records:
        if "scores" not in record:
            raise VlmtuneError(f"{_at(Path(path), record['_line'], 'scores')}: missing, "
                               f"while other lines have scores")
        scores = {normalize_answer(str(k)): v for k, v in record["scores"].items()}
        if normalize_answer(positive) not in scores:
            raise VlmtuneError(f"{_at(Path(path), record['_line'], 'scores')}: no score for the positive "
                               f"label {positive!r} (has {sorted(scores)})")
        out.append(float(scores[normalize_answer(positive)]))
    return out


def metrics_of_file(records: Sequence[dict[str, Any]], path: str | Path, positive: str = POSITIVE,
                    label_set: Sequence[str] | None = None) -> dict[str, Any]:
    """:func:`compute_metrics` over loaded records, with input errors named by file and line.

    Default label set: positive, the reference labels, then the labels of ``scores`` (if any).
    """
    if label_set is not None:
        allowed = {normalize_answer(label) for label in label_set}
        if normalize_answer(positive) not in allowed:
            raise VlmtuneError(f"--positive {positive!r} is not one of --labels {list(label_set)}")
        for record in records:
            if normalize_answer(record["label"]) not in allowed:
                raise VlmtuneError(f"{_at(Path(path), record['_line'], 'label')}: {record['label']!r} "
                                   f"is not one of the labels {list(label_set)}")
    labels = [r["label"] for r in records]
    scores = positive_scores_of(records, positive, path)
    if label_set is None and scores is not None:
        # Score mode knows every label even when the test set shows only one class.
        label_set = seen_label_set(labels + [k for r in records for k in r["scores"]], positive)
    return compute_metrics(labels, [r["predict"] for r in records], positive=positive,
                           label_set=label_set, positive_scores=scores)


def save_metrics(path: str | Path, out: str | Path | None = None, positive: str = POSITIVE,
                 label_set: Sequence[str] | None = None, warn=None) -> tuple[dict[str, Any], Path]:
    """Metrics of a predictions JSONL written to `out` (default: metrics.json next to it); (metrics, out).

    `warn` gets one line when the positive label never occurs (usually a typo or the wrong file), or when the file
    has one label and no label set is given (every other answer then counts as invalid)."""
    path = Path(path)
    records = load_predictions(path)
    metrics = metrics_of_file(records, path, positive=positive, label_set=label_set)
    if warn is not None and metrics["n_positive"] == 0:
        warn(f"warning: the positive label {metrics['positive']!r} never occurs in 'label' of {path}")
    if warn is not None and label_set is None and len(metrics["labels"]) < 2:
        warn(f"warning: only the label {metrics['labels'][0]!r} occurs in {path}, so every other answer counts as "
             f"invalid; pass --labels to name the full label set")
    target = Path(out) if out else path.parent / "metrics.json"
    refuse_input_as_output(target, [path], "--out" if out else "metrics file")
    write_atomic(target, json.dumps({"predictions": str(path), **metrics}, ensure_ascii=False, indent=2) + "\n")
    return metrics, target
