"""`vlmtune sweep OUTPUT_DIR --dataset NAME --dataset_dir DIR`: which checkpoint is best on this data?

    vlmtune sweep /output/my_task --dataset my_test --dataset_dir data            # by F1
    vlmtune sweep /output/my_task --dataset my_test --dataset_dir data --metric roc_auc --max_samples 200

Scores the dataset (label scoring, see `vlmtune predict --mode score`) with the base model, every
`checkpoint-N` in step order and the final adapter in OUTPUT_DIR; prints a table, names the best,
and writes OUTPUT_DIR/sweep.csv, sweep.json and sweep.png. The base model is the adapters'
`base_model_name_or_path` unless --model_name_or_path is given; image pixel limits and the chat template are the
ones saved with the adapters unless given.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from vlmtune.commands.eval import POSITIVE_FLAGS
from vlmtune.commands.options import add_config_options, add_options, build_options, command_parser, given_options
from vlmtune.infer.predict import PredictArgs

CONFIG_FLAGS = ("dataset", "dataset_dir", "media_dir", "max_samples", "model_name_or_path", "labels",
                "positive_label", "image_max_pixels", "image_min_pixels", "default_system", "template",
                "enable_thinking", "bf16", "fp16")


@dataclass
class SweepArgs:
    """How the sweep picks the best point."""

    metric: str = field(default="f1", metadata={
        "help": "Metric that picks the best point: f1, accuracy, precision, recall, specificity, roc_auc (or auc), "
                "pr_auc."})


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("sweep", __doc__)
    parser.add_argument("output_dir", help="a training output_dir (holding checkpoint-N/ and the final adapter)")
    add_config_options(parser, CONFIG_FLAGS, flags=POSITIVE_FLAGS, required=["dataset"])
    add_options(parser, SweepArgs)
    add_options(parser, PredictArgs, ["batch_size"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vlmtune import allocator

    allocator.for_prediction()  # before torch allocates: see vlmtune/allocator.py
    from vlmtune.config import build_config
    from vlmtune.evaluate.sweep import run_sweep

    given = given_options(args, CONFIG_FLAGS)
    cfg = build_config(given, "command line")
    batch_size = build_options(PredictArgs, args, ["batch_size"]).batch_size
    run_sweep(args.output_dir, cfg, build_options(SweepArgs, args).metric, batch_size, set(given))
    return 0


if __name__ == "__main__":
    sys.exit(main())
