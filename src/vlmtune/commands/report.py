"""`vlmtune report PRED.jsonl`: one self-contained HTML file of metrics, curves and mistakes.

    vlmtune report runs/test/predictions.jsonl                       # -> runs/test/report.html
    vlmtune report pred.jsonl --run_dir /output/my_task --out my_task.html --max_gallery 50

See :mod:`vlmtune.evaluate.report` for what the page contains.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from vlmtune.commands.eval import LABEL_KEYS, POSITIVE_FLAGS
from vlmtune.commands.options import add_config_options, add_options, build_options, command_parser
from vlmtune.config import DataConfig
from vlmtune.evaluate.report import write_report
from vlmtune.labels import parse_labels


@dataclass
class ReportArgs:
    """What goes into the page, and where it is written."""

    out: str | None = field(default=None, metadata={"help": "HTML path (default: report.html next to the JSONL)."})
    run_dir: str | None = field(default=None, metadata={
        "help": "Training output_dir: adds loss and metric curves from its trainer_log.jsonl."})
    max_gallery: int = field(default=200, metadata={
        "help": "At most this many misclassified examples in the gallery."})


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("report", __doc__)
    parser.add_argument("predictions", help="prediction JSONL from `vlmtune predict`")
    add_config_options(parser, LABEL_KEYS, flags=POSITIVE_FLAGS)
    add_options(parser, ReportArgs, flags={"run_dir": ["--run_dir", "--run-dir"],
                                           "max_gallery": ["--max_gallery", "--max-gallery"]})
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    own = build_options(ReportArgs, args)
    out = write_report(args.predictions, own.out, own.run_dir, own.max_gallery,
                       args.positive_label or DataConfig.positive_label, parse_labels(args.labels, "--labels"))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
