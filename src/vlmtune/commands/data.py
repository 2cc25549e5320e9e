"""`vlmtune data check [CONFIG.yaml] [--dataset NAMES --dataset_dir DIR --model_name_or_path M] [key=value]`

Prints the counts per split, the answer distribution, token counts per sample (with a model) and
every problem found as `file: record N: field 'x': what is wrong`. Exit code 0 when clean, 1 when not.

`vlmtune data cache [--clear] [--unused_days N]` lists the encoded-data stores (`$VLMTUNE_CACHE`): records,
size on disk, when built and last used; `--clear` removes them (with `--unused_days`, only those no run has
used for N days).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from vlmtune.commands.options import (add_config_arguments, add_config_options, add_options, build_options,
                                      config_values, given_options)
from vlmtune.config import build_config
from vlmtune.data.check_report import cache_report, check_report

FLAG_KEYS = ("dataset", "eval_dataset", "dataset_dir", "media_dir", "model_name_or_path", "cutoff_len", "val_size",
             "max_samples", "image_max_pixels", "image_min_pixels", "template")


@dataclass
class CacheArgs:
    """`vlmtune data cache`: list the encoded-data stores, or remove them."""

    clear: bool = field(default=False, metadata={"help": "Remove the stores instead of listing them."})
    unused_days: float = field(default=0.0, metadata={
        "help": "With --clear: only the stores no run has used for this many days."})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune data", description="dataset checks and the encoded-data stores")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help=__doc__.splitlines()[0], description=__doc__.split("\n\n")[1])
    add_config_arguments(check, "a training YAML: its data and model keys are used")
    add_config_options(check, FLAG_KEYS)
    cache = sub.add_parser("cache", help="list or remove the encoded-data stores", description=CacheArgs.__doc__)
    add_options(cache, CacheArgs)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "cache":
        own = build_options(CacheArgs, args)
        return cache_report(own.clear, own.unused_days)
    values, origin = config_values(args.config, args.overrides, given_options(args, FLAG_KEYS))
    cfg = build_config(values, origin)
    cfg.source = None if origin == "command line" else origin
    processor = None
    if cfg.model.model_name_or_path:
        from vlmtune.data.processor import load_processor
        from vlmtune.model.load import resolve_model_dir

        processor = load_processor(resolve_model_dir(cfg.model.model_name_or_path, cfg.model.cache_dir),
                                   cfg.model.image_max_pixels, cfg.model.image_min_pixels, cfg.data.template,
                                   cfg.data.enable_thinking)
    return check_report(cfg, processor)
