"""`vlmtune inspect`: the trainable-parameter summary of a model + fine-tuning set-up.

With a directory that holds only `config.json` the model is built on the meta device: no weights are
read and no memory is used, so the 7B count can be checked on a laptop.
"""

from __future__ import annotations

import argparse

from vlmtune.config import FinetuneConfig, build_config
from vlmtune.model.adapters import apply_finetuning, parameter_summary
from vlmtune.model.load import build_empty_model, resolve_model_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--finetuning_type", default="lora", choices=["lora", "freeze", "full"])
    parser.add_argument("--lora_rank", type=int, default=FinetuneConfig.lora_rank)
    parser.add_argument("--lora_target", default=FinetuneConfig.lora_target)
    parser.add_argument("--lora_target_experts", default="false", help="MoE: LoRA on the experts too (true/false)")
    parser.add_argument("--freeze_vision_tower", default="true")
    parser.add_argument("--freeze_multi_modal_projector", default="true")
    args = parser.parse_args(argv)
    cfg = build_config({k: v for k, v in vars(args).items()}, origin="command line")
    model_dir = resolve_model_dir(cfg.model.model_name_or_path)
    model = build_empty_model(model_dir)
    model = apply_finetuning(model, cfg.finetune)
    print(parameter_summary(model))
    return 0
