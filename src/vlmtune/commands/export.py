"""`vlmtune export`: merge a LoRA adapter into its base model and write a standard checkpoint.

    vlmtune export --model_name_or_path /data/Qwen2.5-VL-7B-Instruct --adapter_name_or_path /output/my_task \\
        --export_dir /output/my_task-merged [--export_dtype bfloat16] [--export_size 5] [--overwrite]
    vlmtune export merge.yaml                 # LLaMA-Factory's export YAML (examples/merge_lora/*.yaml)
    vllm serve /output/my_task-merged         # an ordinary Qwen2.5-VL: no --enable-lora needed

The YAML's keys and the flags are the same; flags and key=value override the YAML. What the export holds and how
the merge is done: `vlmtune/model/export.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from vlmtune.commands.options import (add_config_arguments, add_config_options, add_options, command_parser,
                                      config_values, given_options, typed_options)
from vlmtune.config import ExportConfig, build_config
from vlmtune.errors import VlmtuneError

MODEL_FLAGS = ("model_name_or_path", "adapter_name_or_path")
EXPORT_FLAGS = tuple(f.name for f in dataclasses.fields(ExportConfig))


@dataclass
class ExportRunArgs:
    """Whether an earlier export may be replaced."""

    overwrite: bool = field(default=False, metadata={
        "help": "Write into a non-empty export_dir: replaces the files an export writes (and stale weight "
                "shards), leaves other files alone. The new export is written beside it and swapped in once "
                "complete: a run that fails or is killed leaves the earlier export whole."})


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("export", __doc__)
    add_config_arguments(parser, "LLaMA-Factory's export YAML")
    add_config_options(parser, MODEL_FLAGS)
    add_options(parser, ExportConfig)
    add_options(parser, ExportRunArgs)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    flags = given_options(args, (*MODEL_FLAGS, *EXPORT_FLAGS, "overwrite"))
    values, origin = config_values(args.config, args.overrides, flags)
    own = ExportRunArgs(**typed_options(ExportRunArgs, {"overwrite": values.pop("overwrite")} if "overwrite" in values
                                        else {}, origin))
    cfg = build_config(values, origin)
    for key, value in (("adapter_name_or_path", cfg.model.adapter_name_or_path), ("export_dir", cfg.export.export_dir)):
        if not value:
            raise VlmtuneError(f"{origin}: '{key}' is not set (pass --{key})")
    template_note(cfg)
    from vlmtune.model.export import export

    e = cfg.export
    export(cfg.model.model_name_or_path, cfg.model.adapter_name_or_path, e.export_dir, e.export_dtype,
           e.export_size, own.overwrite, e.export_device, legacy_format=e.export_legacy_format)
    return 0


def template_note(cfg) -> None:
    """An export keeps the chat template its adapter trained with; a YAML's other `template` is said to be unused."""
    if cfg.data.template is None:
        return
    from vlmtune.model.adapter_files import adapter_files

    saved = adapter_files(cfg.model.adapter_name_or_path).template
    if saved is not None and saved != cfg.data.template:
        print(f"note: template={cfg.data.template} has no effect: the export keeps the chat template the adapter "
              f"trained with ({saved})")
