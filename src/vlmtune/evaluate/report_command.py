"""`vlmtune report PRED.jsonl`: one self-contained HTML file of metrics, curves and mistakes.

    vlmtune report runs/test/predictions.jsonl                       # -> runs/test/report.html
    vlmtune report pred.jsonl --run_dir /output/my_task --out my_task.html --max_gallery 50

See :mod:`vlmtune.evaluate.report` for what the page contains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.files import refuse_input_as_output, write_atomic
from vlmtune.evaluate.command import parse_labels
from vlmtune.evaluate.metrics import POSITIVE, load_predictions, metrics_of_file
from vlmtune.evaluate.report import build_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune report", description=__doc__.split("\n")[0])
    parser.add_argument("predictions", help="prediction JSONL from `vlmtune predict`")
    parser.add_argument("--out", default=None, help="HTML path (default: report.html next to the JSONL)")
    parser.add_argument("--positive", default=POSITIVE, help=f"the positive label (default {POSITIVE})")
    parser.add_argument("--labels", default=None, help="comma-separated label set (default: labels seen, positive first)")
    parser.add_argument("--run_dir", "--run-dir", dest="run_dir", default=None,
                        help="training output_dir: adds loss and metric curves from its trainer_log.jsonl")
    parser.add_argument("--max_gallery", "--max-gallery", dest="max_gallery", type=int, default=200,
                        help="at most this many misclassified examples in the gallery (default 200)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_gallery < 0:
        raise VlmtuneError(f"--max_gallery must be >= 0, got {args.max_gallery}")
    path = Path(args.predictions)
    out = Path(args.out) if args.out else path.parent / "report.html"
    run_dir = Path(args.run_dir) if args.run_dir else None
    inputs = [path] + ([p for p in run_dir.iterdir() if p.is_file()] if run_dir and run_dir.is_dir() else [])
    refuse_input_as_output(out, inputs, "--out" if args.out else "report file")
    records = load_predictions(path)
    images = [Path(i) if Path(i).is_absolute() else path.parent / i for r in records for i in r["images"]]
    refuse_input_as_output(out, images, "--out" if args.out else "report file")  # the gallery reads them
    metrics = metrics_of_file(records, path, positive=args.positive, label_set=parse_labels(args.labels))
    page = build_report(records, metrics, path, run_dir=run_dir, max_gallery=args.max_gallery)
    write_atomic(out, page)
    print(f"wrote {out} ({len(page.encode('utf-8')) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
