"""Plain-text rendering of a metrics dict (for `vlmtune eval`, the report and the sweep).

Aligned by terminal columns, not characters: CJK labels are two columns wide.
"""

from __future__ import annotations

import unicodedata
from typing import Any


def width(text: str) -> int:
    """Terminal columns of ``text``: wide (CJK) characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, cols: int, right: bool = False) -> str:
    """``text`` padded with spaces to ``cols`` terminal columns (left- or right-aligned)."""
    fill = " " * max(0, cols - width(text))
    return fill + text if right else text + fill


def fmt(value: Any) -> str:
    """A metric value for humans: 4 decimals, ``n/a`` for undefined (None)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metric_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, formatted value) for every headline metric, score metrics when present."""
    rate = f"  ({m['invalid_rate']:.1%})" if m["invalid_rate"] else ""
    rows = [
        ("examples", fmt(m["n"])),
        ("positive label", f"{m['positive']}  ({m['n_positive']} examples, {m['n_negative']} others)"),
        ("accuracy", fmt(m["accuracy"])),
        ("precision", fmt(m["precision"])),
        ("recall", fmt(m["recall"])),
        ("F1", fmt(m["f1"])),
        ("specificity", fmt(m["specificity"])),
        ("invalid answers", f"{m['n_invalid']}{rate}"),
    ]
    if "roc_auc" in m:
        rows += [
            ("ROC-AUC", fmt(m["roc_auc"])),
            ("PR-AUC (AP)", fmt(m["pr_auc"])),
            ("best-F1 threshold", fmt(m["best_threshold"]) + ("  (positive if P(positive) >= it)"
                                                             if m["best_threshold"] is not None else "")),
            ("  accuracy there", fmt(m["best_threshold_accuracy"])),
            ("  precision there", fmt(m["best_threshold_precision"])),
            ("  recall there", fmt(m["best_threshold_recall"])),
            ("  F1 there", fmt(m["best_threshold_f1"])),
        ]
    return rows


def format_table(m: dict[str, Any]) -> str:
    """The metrics and the confusion matrix as aligned plain text."""
    rows = metric_rows(m)
    key_cols = max(width(k) for k, _ in rows)
    lines = [f"{pad(k, key_cols)}  {v}" for k, v in rows]

    cm = m["confusion_matrix"]
    corner = "true \\ answer"
    lines += ["", "confusion matrix (rows: true label, columns: answer)"]
    first = max([width(corner)] + [width(r) for r in cm["rows"]])
    cols = [max([width(c)] + [len(str(row[j])) for row in cm["matrix"]]) for j, c in enumerate(cm["columns"])]
    lines.append("  ".join([pad(corner, first)] + [pad(c, w, right=True) for c, w in zip(cm["columns"], cols)]))
    for label, row in zip(cm["rows"], cm["matrix"]):
        lines.append("  ".join([pad(label, first)] + [pad(str(v), w, right=True) for v, w in zip(row, cols)]))
    return "\n".join(lines)
