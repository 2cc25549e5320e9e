"""`vlmtune synth`: generate synthetic compliance scenes with labels.

    vlmtune synth --n 2000 --out data --seed 1 --preset full --name synth_train
    vlmtune synth --n 200  --out data --seed 2 --rules 1,2,5 --name synth_test

Writes ``DIR/images/*.png``, ``DIR/<name>.json`` (ShareGPT records), ``DIR/<name>.truth.jsonl``
(the scene and which rules hold, per sample) and merges ``<name>`` into ``DIR/dataset_info.json``.
"""

from __future__ import annotations

import argparse
import time

from vlmtune.errors import VlmtuneError
from vlmtune.synth.dataset import generate
from vlmtune.synth.rules import PRESETS, RULES


class _Parser(argparse.ArgumentParser):
    """argparse that raises VlmtuneError (one line, exit 1) instead of printing usage and exiting 2."""

    def error(self, message: str):  # type: ignore[override]
        raise VlmtuneError(f"vlmtune synth: {message} (see `vlmtune synth --help`)")


def build_parser() -> argparse.ArgumentParser:
    rules_help = "; ".join(f"{r.number}={r.key}" for r in RULES)
    p = _Parser(prog="vlmtune synth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed -> identical files (default 0)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="easy = rules 1,2; full = all seven (default)")
    p.add_argument("--rules", default=None, help=f"explicit active rules, e.g. 1,2,5 (overrides --preset): {rules_help}")
    p.add_argument("--break_prob", type=float, default=0.5,
                   help="fraction of negative samples (default 0.5); 0 gives all 满足要求")
    p.add_argument("--extra_break", type=float, default=0.25,
                   help="in a negative, chance that each further active rule is broken too (default 0.25)")
    p.add_argument("--inactive_break", type=float, default=0.3,
                   help="chance that each inactive rule is broken; never affects the label (default 0.3)")
    p.add_argument("--name", default="synth_train", help="dataset name: file stem and dataset_info key")
    p.add_argument("--image_size", type=int, default=448, help="image side in pixels (default 448)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on a terminal when n >= 200)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.preset is not None and args.rules is not None:
        raise VlmtuneError("give either --preset or --rules, not both")
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
