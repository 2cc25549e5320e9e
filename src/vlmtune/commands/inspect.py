"""`vlmtune inspect`: the trainable-parameter summary of a model + fine-tuning set-up.

With a directory that holds only `config.json` the model is built on the meta device: no weights are
read and no memory is used, so the 7B count can be checked on a laptop.
"""

from __future__ import annotations

import argparse

from vlmtune.commands.options import add_config_options, given_options
from vlmtune.config import build_config

FLAG_KEYS = ("model_name_or_path", "finetuning_type", "lora_rank", "lora_target", "lora_target_experts",
             "additional_target", "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model",
             "freeze_trainable_layers", "freeze_trainable_modules")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune inspect", description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    add_config_options(parser, FLAG_KEYS, required=["model_name_or_path"])
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = build_config(given_options(args, FLAG_KEYS), origin="command line")
    from vlmtune.model.adapters import apply_finetuning, parameter_summary
    from vlmtune.model.load import build_empty_model, resolve_model_dir

    model = build_empty_model(resolve_model_dir(cfg.model.model_name_or_path))
    model = apply_finetuning(model, cfg.finetune)
    print(parameter_summary(model))
    return 0
