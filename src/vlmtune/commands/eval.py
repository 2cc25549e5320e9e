"""`vlmtune eval PRED.jsonl`: metrics of a predictions file, printed and saved as metrics.json.

    vlmtune eval runs/test/predictions.jsonl                       # -> runs/test/metrics.json
    vlmtune eval pred.jsonl --positive 满足要求 --labels 满足要求,不满足要求 --out m.json

Answers are compared by exact equality after strip (see :mod:`vlmtune.evaluate.metrics`); an
answer equal to no label is counted as invalid. ROC-AUC, PR-AUC and the best-F1 threshold are added
when the file has label probabilities (``scores``, from `vlmtune predict` in score mode).
No torch is imported: this runs anywhere the predictions file is.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from vlmtune.commands.options import add_config_options, add_options, build_options, command_parser
from vlmtune.config import DataConfig
from vlmtune.evaluate.metrics import save_metrics
from vlmtune.evaluate.table import format_table
from vlmtune.labels import parse_labels

# `--positive`: the shorter spelling the commands had before the flag took the YAML key's name.
POSITIVE_FLAGS = {"positive_label": ["--positive_label", "--positive"]}
LABEL_KEYS = ("labels", "positive_label")


@dataclass
class EvalArgs:
    """Where `vlmtune eval` writes."""

    out: str | None = field(default=None, metadata={
        "help": "Metrics JSON path (default: metrics.json next to the JSONL)."})


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("eval", __doc__)
    parser.add_argument("predictions", help="prediction JSONL from `vlmtune predict`")
    add_config_options(parser, LABEL_KEYS, flags=POSITIVE_FLAGS)
    add_options(parser, EvalArgs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    own = build_options(EvalArgs, args)
    positive = args.positive_label or DataConfig.positive_label
    metrics, out = save_metrics(args.predictions, own.out, positive, parse_labels(args.labels, "--labels"),
                                warn=lambda line: print(line, file=sys.stderr))
    print(f"predictions: {args.predictions}")
    print(format_table(metrics))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
