"""`vlmtune demo [--out DIR]`: the whole workflow on synthetic scenes and a tiny model, on a CPU.

    vlmtune demo                                  # -> demo_out/ (a few minutes on 2 cores)
    vlmtune demo --out /tmp/demo --steps 300 --n_train 1000 --n_test 200

Base model, scenes, LoRA training, predictions before and after, metrics and the HTML report, each step with
vlmtune's own code (see `vlmtune/demo/workflow.py`). Each step's full log goes to DIR/logs/; the terminal gets one
line per step and the training bar.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from vlmtune.commands.options import OneLineParser, add_options, build_options, command_parser
from vlmtune.demo.workflow import BATCH_SIZE, DEFAULT_OUT, DEFAULT_STEPS, DEFAULT_TEST, DEFAULT_TRAIN, DEFAULT_VAL


@dataclass
class DemoArgs:
    """The demo's size."""

    out: str = field(default=DEFAULT_OUT, metadata={"help": "Output directory; reused if present."})
    steps: int = field(default=DEFAULT_STEPS, metadata={"help": f"LoRA optimisation steps of {BATCH_SIZE} samples."})
    n_train: int = field(default=DEFAULT_TRAIN, metadata={"help": "Training scenes."})
    n_val: int = field(default=DEFAULT_VAL, metadata={"help": "Validation scenes."})
    n_test: int = field(default=DEFAULT_TEST, metadata={"help": "Held-out test scenes."})
    eval_steps: int | None = field(default=None, metadata={
        "help": "Evaluate (and save) every n steps (default: steps / 4)."})
    seed: int = field(default=42, metadata={"help": "Training seed (data order, LoRA initialisation)."})


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("demo", __doc__, OneLineParser)
    add_options(parser, DemoArgs)
    return parser


def main(argv: list[str]) -> int:
    args = build_options(DemoArgs, build_parser().parse_args(argv))
    from vlmtune.demo.workflow import run_demo, summary

    print(f"vlmtune demo: LoRA fine-tuning of a tiny Qwen2.5-VL on synthetic compliance scenes, into {args.out}",
          flush=True)
    result = run_demo(args.out, args.steps, args.n_train, args.n_val, args.n_test, args.eval_steps, args.seed)
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
