"""`vlmtune sweep OUTPUT_DIR --dataset NAME --dataset_dir DIR`: which checkpoint is best on this data?

    vlmtune sweep /output/my_task --dataset my_test --dataset_dir data            # by F1
    vlmtune sweep /output/my_task --dataset my_test --dataset_dir data --metric roc_auc --max_samples 200

Scores the dataset (label scoring, see `vlmtune predict --mode score`) with the base model, every
`checkpoint-N` in step order and the final adapter in OUTPUT_DIR; prints a table, names the best,
and writes OUTPUT_DIR/sweep.csv, sweep.json and sweep.png. The base model is the adapters'
`base_model_name_or_path` unless --model_name_or_path is given; image pixel limits are the ones
saved with the adapters unless given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.evaluate.metrics import POSITIVE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune sweep", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    parser.add_argument("output_dir", help="a training output_dir (holding checkpoint-N/ and the final adapter)")
    parser.add_argument("--dataset", required=True, help="dataset name(s) from dataset_info.json")
    parser.add_argument("--dataset_dir", default="data", help="folder holding dataset_info.json (default: data)")
    parser.add_argument("--metric", default="f1", help="metric that picks the best point: f1 (default), accuracy, "
                                                       "precision, recall, specificity, roc_auc, pr_auc")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_samples", type=int, default=None, help="use the first n records of each dataset")
    parser.add_argument("--model_name_or_path", default=None, help="base model (default: from adapter_config.json)")
    parser.add_argument("--labels", default=None, help="comma-separated label set (default: the dataset's answers)")
    parser.add_argument("--positive", default=POSITIVE, help=f"positive label (default {POSITIVE})")
    parser.add_argument("--image_max_pixels", type=int, default=None)
    parser.add_argument("--image_min_pixels", type=int, default=None)
    parser.add_argument("--default_system", default=None)
    parser.add_argument("--template", default=None, help="chat template (default: the one saved with the adapters)")
    parser.add_argument("--enable_thinking", default=None, choices=["true", "false"],
                        help="reasoning templates: see the YAML key (default: as saved with the adapters)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--fp16", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vlmtune import allocator

    allocator.for_prediction()  # before torch allocates: see vlmtune/allocator.py
    from vlmtune.config import build_config
    from vlmtune.evaluate.command import parse_labels
    from vlmtune.evaluate.sweep import (evaluate_points, find_points, format_sweep_table, normalise_metric,
                                        write_sweep)
    from vlmtune.evaluate.sweep import SWEEP_FILES
    from vlmtune.files import refuse_input_as_output
    from vlmtune.infer.command import load_test_data, prediction_inputs
    from vlmtune.infer.scoring import infer_label_set

    metric = normalise_metric(args.metric)
    if args.batch_size <= 0:
        raise VlmtuneError(f"--batch_size must be > 0, got {args.batch_size}")
    points = find_points(args.output_dir)
    values = {"dataset": args.dataset, "dataset_dir": args.dataset_dir}
    if args.max_samples is not None:
        values["max_samples"] = args.max_samples
    cfg = build_config(values, "command line")
    conversations = load_test_data(cfg)
    inputs = prediction_inputs(cfg, conversations)
    for name in SWEEP_FILES:  # a dataset kept in the run directory as sweep.json is not written over
        refuse_input_as_output(Path(args.output_dir) / name, inputs, "sweep output")
    labels = parse_labels(args.labels) or infer_label_set(conversations)
    if labels is None:
        raise VlmtuneError(f"dataset '{args.dataset}': the answers do not form a small closed label set; "
                           f"pass --labels a,b")
    positive = args.positive.strip()
    if positive not in labels:
        raise VlmtuneError(f"--positive {positive!r} is not one of the labels {labels}")
    labels = [positive] + [label for label in labels if label != positive]
    outside = sorted({c.answer.strip() for c in conversations} - set(labels))
    if outside:
        raise VlmtuneError(f"dataset '{args.dataset}': answer {outside[0]!r} is not one of the labels {labels}")
    print(f"sweep of {args.output_dir}: {', '.join(p.name for p in points)}")
    rows = evaluate_points(points, conversations, labels, positive, args.model_name_or_path, args.batch_size,
                           args.image_max_pixels, args.image_min_pixels, args.bf16, args.fp16,
                           args.default_system, args.template,
                           None if args.enable_thinking is None else args.enable_thinking == "true")
    best = write_sweep(args.output_dir, rows, metric, args.dataset, labels, positive)
    print()
    print(format_sweep_table(rows, metric))
    print()
    if best is None:
        print(f"best: none ({metric} is undefined at every point)")
    else:
        step = "" if best["step"] is None else f", step {best['step']}"
        where = f" ({best['adapter']})" if best["adapter"] else ""
        print(f"best by {metric}: {best['name']}{step}{where}: {best[metric]:.4f}")
    out = Path(args.output_dir)
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
