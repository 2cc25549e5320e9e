"""`vlmtune tiny-model --out DIR [--arch MODEL_TYPE]`: a tiny random model that loads like a real checkpoint
of its family (see `vlmtune/model/tiny.py` for how it is built)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from vlmtune.commands.options import add_options, build_options
from vlmtune.errors import VlmtuneError
from vlmtune.families import MODEL_TYPES, TINY_DEFAULT, family_of_type


@dataclass
class TinyModelArgs:
    """The tiny model's family and sizes."""

    out: str = field(default="", metadata={"help": "Directory to write the model into."})
    arch: str = field(default=TINY_DEFAULT, metadata={
        "help": f"The family's model_type (config.json): {', '.join(MODEL_TYPES)}."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights (the same seed, the same model)."})
    text_hidden: int = field(default=128, metadata={"help": "Hidden size of the language model (a multiple of 32)."})
    text_layers: int = field(default=2, metadata={"help": "Decoder layers of the language model."})
    vision_hidden: int = field(default=64, metadata={"help": "Hidden size of the vision tower."})
    vision_depth: int = field(default=2, metadata={"help": "Blocks of the vision tower."})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune tiny-model", description=__doc__)
    add_options(parser, TinyModelArgs, required=["out"])
    return parser


def main(argv: list[str]) -> int:
    spec = build_options(TinyModelArgs, build_parser().parse_args(argv))
    if spec.arch not in MODEL_TYPES:
        raise VlmtuneError(f"--arch must be one of {', '.join(MODEL_TYPES)}, got {spec.arch!r}")
    if spec.text_hidden % 32:
        raise VlmtuneError("--text_hidden must be a multiple of 32")
    from vlmtune.model.tiny import build_tiny_model

    out = build_tiny_model(spec.out, spec.seed, spec.text_hidden, spec.text_layers, spec.vision_hidden,
                           spec.vision_depth, arch=spec.arch)
    print(f"tiny {family_of_type(spec.arch).name} written to {out} ({len(list(out.iterdir()))} files)")
    return 0
