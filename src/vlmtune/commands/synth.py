"""`vlmtune synth`: generate synthetic compliance scenes with labels.

    vlmtune synth --n 2000 --out data --seed 1 --preset full --name synth_train
    vlmtune synth --n 200  --out data --seed 2 --rules 1,2,5 --name synth_test

Writes ``DIR/images/*.png``, ``DIR/<name>.json`` (ShareGPT records), ``DIR/<name>.truth.jsonl``
(the scene and which rules hold, per sample) and merges ``<name>`` into ``DIR/dataset_info.json``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from vlmtune.commands.options import OneLineParser, add_options, build_options
from vlmtune.errors import VlmtuneError
from vlmtune.synth.rules import PRESETS, RULES


@dataclass
class SynthArgs:
    """What to generate (the scene generator's settings: `vlmtune/synth/`)."""

    n: int = field(default=0, metadata={"help": "Number of samples."})
    out: str = field(default="", metadata={"help": "Output directory (created if missing)."})
    seed: int = field(default=0, metadata={"help": "Random seed of the scenes: the same seed, identical files."})
    preset: str | None = field(default=None, metadata={
        "help": f"Active rules by name: {', '.join(sorted(PRESETS))} (easy = rules 1,2; full = all seven, the "
                f"default)."})
    rules: str | None = field(default=None, metadata={
        "help": "Explicit active rules, e.g. 1,2,5 (instead of --preset): "
                + "; ".join(f"{r.number}={r.key}" for r in RULES) + "."})
    break_prob: float = field(default=0.5, metadata={"help": "Fraction of negative samples; 0 gives all 满足要求."})
    extra_break: float = field(default=0.25, metadata={
        "help": "In a negative, the chance that each further active rule is broken too."})
    inactive_break: float = field(default=0.3, metadata={
        "help": "The chance that each inactive rule is broken; never affects the label."})
    name: str = field(default="synth_train", metadata={"help": "Dataset name: file stem and dataset_info key."})
    image_size: int = field(default=448, metadata={"help": "Image side in pixels."})
    progress: bool | None = field(default=None, metadata={
        "help": "Progress bar (default: on a terminal when n >= 200); --no-progress is --progress false."})


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vlmtune synth", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, SynthArgs, required=["n", "out"])
    parser.add_argument("--no-progress", dest="progress", action="store_const", const="false",
                        help=argparse.SUPPRESS)
    return parser


def main(argv: list[str]) -> int:
    args = build_options(SynthArgs, build_parser().parse_args(argv))
    if args.preset is not None and args.rules is not None:
        raise VlmtuneError("give either --preset or --rules, not both")
    from vlmtune.synth.dataset import generate

    start = time.perf_counter()
    path = generate(args.n, args.out, seed=args.seed, preset=args.preset, rules=args.rules, name=args.name,
                    image_size=args.image_size, break_prob=args.break_prob, extra_break=args.extra_break,
                    inactive_break=args.inactive_break, progress=args.progress)
    took = time.perf_counter() - start
    truth = path.with_name(f"{args.name}.truth.jsonl")
    n_pos = sum('"label": "满足要求"' in line for line in truth.read_text(encoding="utf-8").splitlines())
    print(f"wrote {args.n} samples ({n_pos} 满足要求 / {args.n - n_pos} 不满足要求) to {path} "
          f"in {took:.1f} s ({args.n / took:.0f} img/s)")
    print(f"registered '{args.name}' in {path.parent / 'dataset_info.json'}; truth in {truth}")
    return 0
