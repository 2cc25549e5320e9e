"""`vlmtune eval PRED.jsonl`: metrics of a predictions file, printed and saved as metrics.json.

    vlmtune eval runs/test/predictions.jsonl                       # -> runs/test/metrics.json
    vlmtune eval pred.jsonl --positive 满足要求 --labels 满足要求,不满足要求 --out m.json

Answers are compared by exact equality after strip (see :mod:`vlmtune.evaluate.metrics`); an
answer equal to no label is counted as invalid. ROC-AUC, PR-AUC and the best-F1 threshold are added
when the file has label probabilities (``scores``, from `vlmtune predict` in score mode).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.files import refuse_input_as_output, write_atomic
from vlmtune.evaluate.metrics import POSITIVE, load_predictions, metrics_of_file
from vlmtune.evaluate.table import format_table


def parse_labels(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (also accepts the full-width comma ，)."""
    if text is None:
        return None
    labels = [part.strip() for part in text.replace("，", ",").split(",") if part.strip()]
    if not labels:
        raise VlmtuneError("--labels: empty list")
    if len(set(labels)) != len(labels):
        raise VlmtuneError(f"--labels {text!r}: the same label twice")
    return labels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune eval", description=__doc__.split("\n")[0])
    parser.add_argument("predictions", help="prediction JSONL from `vlmtune predict`")
    parser.add_argument("--positive", default=POSITIVE, help=f"the positive label (default {POSITIVE})")
    parser.add_argument("--labels", default=None,
                        help="comma-separated label set (default: the labels seen in the file, positive first); "
                             "answers equal to none of them are invalid")
    parser.add_argument("--out", default=None, help="metrics JSON path (default: metrics.json next to the JSONL)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.predictions)
    records = load_predictions(path)
    metrics = metrics_of_file(records, path, positive=args.positive, label_set=parse_labels(args.labels))
    if metrics["n_positive"] == 0:
        # Usually a typo in --positive or the wrong file: say so instead of printing n/a silently.
        print(f"warning: the positive label {metrics['positive']!r} never occurs in 'label' of {path}",
              file=sys.stderr)
    if args.labels is None and len(metrics["labels"]) < 2:
        print(f"warning: only the label {metrics['labels'][0]!r} occurs in {path}, so every other answer "
              f"counts as invalid; pass --labels to name the full label set", file=sys.stderr)
    out = Path(args.out) if args.out else path.parent / "metrics.json"
    refuse_input_as_output(out, [path], "--out" if args.out else "metrics file")
    text = json.dumps({"predictions": str(path), **metrics}, ensure_ascii=False, indent=2) + "\n"
    print(f"predictions: {path}")
    print(format_table(metrics))
    write_atomic(out, text)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
