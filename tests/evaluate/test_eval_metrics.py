"""vlmtune.evaluate.metrics against an independent, deliberately naive computation.

The reference below uses plain loops and brute force (AUC by counting every positive/negative
pair), so a bug in the vectorised code (tie handling, the invalid column, the substring trap)
shows up as a mismatch.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.evaluate.metrics import (SCORE_KEYS, compute_metrics, load_predictions, metrics_of_file,
                                      positive_scores_of, pr_curve, roc_curve, scalar_metrics)

POS, NEG = "满足要求", "不满足要求"
# Answers a model really produces: near-misses must be invalid, whitespace-only differences valid.
ANSWERS = [POS, NEG, "满足", "不满足要求。", " 满足要求 ", "不满足要求\n", "", "满足要求满足要求", "要求"]


def reference(labels, predicts, positive, label_set, scores=None):
    """Independent metrics: loops, brute-force pairs, thresholds tried one by one."""
    t = [x.strip() for x in labels]
    p = [x.strip() for x in predicts]
    n = len(t)
    tp = fp = fn = tn = correct = invalid = 0
    for a, b in zip(t, p):
        if b not in label_set:
            invalid += 1
        if a == b:
            correct += 1
        if a == positive and b == positive:
            tp += 1
        elif a == positive:
            fn += 1
        elif b == positive:
            fp += 1
        elif a == b:
            tn += 1
    npos = sum(1 for a in t if a == positive)
    nneg = n - npos

    def div(x, y):
        return None if y == 0 else x / y

    prec, rec = div(tp, tp + fp), div(tp, npos)
    f1 = None if (tp + fp + fn) == 0 else 2 * tp / (2 * tp + fp + fn)
    out = dict(n=n, tp=tp, fp=fp, fn=fn, tn=tn, accuracy=div(correct, n), precision=prec, recall=rec,
               f1=f1, specificity=div(tn, nneg), n_invalid=invalid, n_positive=npos, n_negative=nneg)
    matrix = []
    for row_label in label_set:
        row = [0] * (len(label_set) + 1)
        for a, b in zip(t, p):
            if a == row_label:
                row[label_set.index(b) if b in label_set else len(label_set)] += 1
        matrix.append(row)
    out["matrix"] = matrix
    if scores is not None:
        pos_s = [s for s, a in zip(scores, t) if a == positive]
        neg_s = [s for s, a in zip(scores, t) if a != positive]
        if pos_s and neg_s:
            wins = 0.0
            for x in pos_s:
                for y in neg_s:
                    wins += 1.0 if x > y else 0.5 if x == y else 0.0
            out["roc_auc"] = wins / (len(pos_s) * len(neg_s))
        else:
            out["roc_auc"] = None
        if not pos_s:
            out.update(pr_auc=None, best_threshold=None, best_threshold_f1=None, best_threshold_accuracy=None,
                       best_threshold_precision=None, best_threshold_recall=None)
            return out
        ap, prev_recall, best = 0.0, 0.0, None
        for thr in sorted(set(scores), reverse=True):
            ttp = sum(1 for s, a in zip(scores, t) if s >= thr and a == positive)
            tfp = sum(1 for s, a in zip(scores, t) if s >= thr and a != positive)
            r, pr = ttp / npos, ttp / (ttp + tfp)
            ap += (r - prev_recall) * pr
            prev_recall = r
            f = 2 * ttp / (2 * ttp + tfp + (npos - ttp))
            acc = (ttp + (nneg - tfp)) / n
            # Strictly better only, scanning from the highest threshold: ties keep the higher one.
            if best is None or (f, acc) > (best[0], best[1]):
                best = (f, acc, thr, pr, r)
        out.update(pr_auc=ap, best_threshold_f1=best[0], best_threshold_accuracy=best[1], best_threshold=best[2],
                   best_threshold_precision=best[3], best_threshold_recall=best[4])
    return out


def assert_matches(got, want):
    for key, value in want.items():
        if key == "matrix":
            assert got["confusion_matrix"]["matrix"] == value
        elif value is None or isinstance(value, int):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key


def test_hand_made_example():
    labels = [POS, POS, NEG, NEG]
    predicts = [POS, NEG, "不满足要求。", POS]
    m = compute_metrics(labels, predicts, positive_scores=[0.9, 0.4, 0.4, 0.7])
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["n_invalid"]) == (1, 1, 1, 0, 1)
    assert m["accuracy"] == 0.25 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["specificity"] == 0.0
    assert m["confusion_matrix"] == {"rows": [POS, NEG], "columns": [POS, NEG, "invalid"],
                                     "matrix": [[1, 1, 0], [1, 0, 1]]}
    assert m["roc_auc"] == 0.625  # pairs: 1 + 1 + 0.5 (tie at 0.4) + 0, over 4
    assert m["pr_auc"] == 0.75
    assert m["best_threshold"] == 0.9 and m["best_threshold_f1"] == pytest.approx(2 / 3)


def test_substring_trap():
    """不满足要求 contains 满足要求: it must never count as the positive answer."""
    m = compute_metrics([NEG, NEG, NEG], [NEG, NEG, " 不满足要求 "])
    assert m["tp"] == 0 and m["fp"] == 0 and m["accuracy"] == 1.0 and m["specificity"] == 1.0
    assert m["precision"] is None  # nothing claimed positive
    m = compute_metrics([POS, POS], [NEG, "不满足要求。"], label_set=[POS, NEG])
    assert m["tp"] == 0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["n_invalid"] == 1
    # Without a label set only the labels seen (here just POS) are valid answers.
    assert compute_metrics([POS, POS], [NEG, "不满足要求。"])["n_invalid"] == 2


@pytest.mark.parametrize("answer,valid", [("满足", False), ("不满足要求。", False), ("满足要求！", False),
                                          ("满足要求满足要求", False), (" 满足要求\n", True), ("\t不满足要求 ", True)])
def test_invalid_answers(answer, valid):
    m = compute_metrics([POS, NEG], [answer, answer])
    assert m["n_invalid"] == (0 if valid else 2)
    assert m["confusion_matrix"]["matrix"][0][2] == (0 if valid else 1)


@pytest.mark.parametrize("seed", range(120))
def test_random_against_reference(seed):
    rng = random.Random(seed)
    n = rng.randint(0, 40)
    labels = [rng.choice([POS, NEG, NEG + " "]) for _ in range(n)]  # trailing space in a label is stripped
    if seed % 7 == 0:
        labels = [NEG] * n  # no positives at all
    if seed % 11 == 0:
        labels = [POS] * n  # no negatives at all
    predicts = [rng.choice(ANSWERS) for _ in range(n)]
    # One decimal: plenty of tied scores, the case rank formulas get wrong.
    scores = [round(rng.random(), 1) for _ in range(n)]
    got = compute_metrics(labels, predicts, positive=POS, label_set=[POS, NEG], positive_scores=scores)
    assert_matches(got, reference(labels, predicts, POS, [POS, NEG], scores))
    json.dumps(got, allow_nan=False)  # undefined values are null, never NaN


def test_three_labels_and_explicit_label_set():
    labels = ["a", "b", "c", "a", "c"]
    predicts = ["a", "c", "c", "maybe", "b"]
    got = compute_metrics(labels, predicts, positive="a", label_set=["a", "b", "c"])
    assert_matches(got, reference(labels, predicts, "a", ["a", "b", "c"]))
    assert got["confusion_matrix"]["matrix"] == [[1, 0, 0, 1], [0, 0, 1, 0], [0, 1, 1, 0]]
    with pytest.raises(ValueError, match="not in the label set"):
        compute_metrics(["a", "z"], ["a", "a"], positive="a", label_set=["a", "b"])
    with pytest.raises(ValueError, match="positive"):
        compute_metrics(["a"], ["a"], positive="x", label_set=["a", "b"])


def test_default_label_set_positive_first():
    m = compute_metrics([NEG, "其他"], [NEG, NEG])
    assert m["labels"] == [POS, NEG, "其他"] and m["n_positive"] == 0 and m["recall"] is None


def test_degenerate_cases_do_not_crash():
    m = compute_metrics([], [], positive_scores=[])
    assert m["n"] == 0 and m["accuracy"] is None and m["roc_auc"] is None and m["pr_auc"] is None
    m = compute_metrics([POS, NEG, POS], [POS, POS, NEG], positive_scores=[0.5, 0.5, 0.5])
    assert m["roc_auc"] == 0.5  # all tied: chance
    assert m["best_threshold"] == 0.5 and m["best_threshold_recall"] == 1.0
    m = compute_metrics([POS, POS], [POS, NEG], positive_scores=[0.2, 0.8])
    assert m["roc_auc"] is None and m["pr_auc"] == 1.0
    assert set(SCORE_KEYS) <= set(m)
    assert not set(SCORE_KEYS) & set(compute_metrics([POS], [POS]))  # score keys only with scores
    assert "confusion_matrix" not in scalar_metrics(m) and "roc_auc" not in scalar_metrics(m)


def test_best_threshold_ties_prefer_accuracy():
    # t=0.9: tp 1, fp 0 -> F1 2/3, accuracy 0.75; t=0.6: tp 2, fp 2 -> F1 2/3 too, accuracy 0.5.
    m = compute_metrics([POS, NEG, NEG, POS], [POS] * 4, positive_scores=[0.9, 0.8, 0.7, 0.6])
    assert m["best_threshold_f1"] == pytest.approx(2 / 3)
    assert m["best_threshold"] == 0.9 and m["best_threshold_accuracy"] == 0.75


def test_curves():
    y, s = [True, False, True, False], [0.9, 0.8, 0.4, 0.1]
    assert roc_curve(y, s) == ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    recall, precision, thresholds = pr_curve(y, s)
    assert recall == [0.5, 0.5, 1.0, 1.0] and thresholds == [0.9, 0.8, 0.4, 0.1]
    assert precision == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert roc_curve([True], [0.3]) == ([], []) and pr_curve([False], [0.3]) == ([], [], [])


# ---------------------------------------------------------------------------------------------
# load_predictions


def write(tmp_path: Path, lines: list[str], name: str = "pred.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(**kw) -> str:
    base = {"id": "x", "images": ["a.jpg"], "prompt": "1. rule", "predict": POS, "label": POS}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not ...}, ensure_ascii=False)


def test_load_and_metrics_of_file_match_reference(tmp_path):
    rng = random.Random(5)
    lines, labels, predicts, scores = [], [], [], []
    for i in range(60):
        label, answer, p = rng.choice([POS, NEG]), rng.choice(ANSWERS), round(rng.random(), 2)
        labels.append(label), predicts.append(answer), scores.append(p)
        lines.append(row(id=f"r{i}", label=label, predict=answer, scores={POS: p, NEG: 1 - p}))
        if i % 13 == 0:
            lines.append("   ")  # blank lines are ignored
    path = write(tmp_path, lines)
    records = load_predictions(path)
    assert len(records) == 60 and records[1]["_line"] == 3
    got = metrics_of_file(records, path)
    assert_matches(got, reference(labels, predicts, POS, [POS, NEG], scores))


@pytest.mark.parametrize("bad,needle", [
    ("{not json", "line 2: invalid JSON"),
    ('["a list"]', "line 2: expected a JSON object"),
    (row(predict=...), "line 2: field 'predict': missing"),
    (row(label=...), "line 2: field 'label': missing"),
    (row(predict=None), "line 2: field 'predict': must be a string"),
    (row(scores=[0.5, 0.5]), "line 2: field 'scores'"),
    (row(scores={POS: "high"}), "line 2: field 'scores'"),
    (row(images=3), "line 2: field 'images'"),
])
def test_load_errors_name_file_line_field(tmp_path, bad, needle):
    path = write(tmp_path, [row(), bad, row()])
    with pytest.raises(VlmtuneError) as info:
        load_predictions(path)
    message = str(info.value)
    assert str(path) in message and needle in message and "\n" not in message


def test_load_file_level_errors(tmp_path):
    with pytest.raises(VlmtuneError, match="not found"):
        load_predictions(tmp_path / "nope.jsonl")
    with pytest.raises(VlmtuneError, match="empty"):
        load_predictions(write(tmp_path, ["", "  "]))


def test_scores_must_be_all_or_nothing(tmp_path):
    path = write(tmp_path, [row(scores={POS: 0.7, NEG: 0.3}), row(), row(scores={NEG: 1.0})])
    records = load_predictions(path)
    with pytest.raises(VlmtuneError, match="line 2: field 'scores': missing"):
        positive_scores_of(records, POS, path)
    assert positive_scores_of(load_predictions(write(tmp_path, [row(), row()])), POS, path) is None
    path = write(tmp_path, [row(scores={NEG: 1.0})])
    with pytest.raises(VlmtuneError, match="line 1: field 'scores': no score for the positive"):
        positive_scores_of(load_predictions(path), POS, path)


def test_metrics_of_file_label_outside_labels(tmp_path):
    path = write(tmp_path, [row(), row(label="也许")])
    with pytest.raises(VlmtuneError, match="line 2: field 'label'"):
        metrics_of_file(load_predictions(path), path, label_set=[POS, NEG])
    assert math.isclose(metrics_of_file(load_predictions(path), path)["accuracy"], 0.5)


def test_metrics_of_file_label_set_includes_score_keys(tmp_path):
    """A test set with one class still knows the other label from the scores."""
    path = write(tmp_path, [row(predict=NEG, scores={POS: 0.4, NEG: 0.6}), row(scores={POS: 0.8, NEG: 0.2})])
    m = metrics_of_file(load_predictions(path), path)
    assert m["labels"] == [POS, NEG] and m["n_invalid"] == 0 and m["fn"] == 1


def test_labels_in_nfd_and_nfc_are_one_label():
    """Issue 25 item 4: a reference label typed in NFD (macOS) is the answer the model gives in NFC."""
    import unicodedata

    from vlmtune.evaluate.metrics import compute_metrics

    fit, unfit = "적합", "부적합"
    nfd = [unicodedata.normalize("NFD", label) for label in (fit, unfit, fit)]
    metrics = compute_metrics(nfd, [fit, unfit, fit + " "], positive=unicodedata.normalize("NFD", fit))
    assert metrics["accuracy"] == 1.0 and metrics["n_invalid"] == 0
