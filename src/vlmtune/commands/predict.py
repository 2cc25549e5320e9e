"""`vlmtune predict`: base model + adapter over a dataset into a prediction JSONL.

    vlmtune predict --model_name_or_path /data/Qwen2.5-VL-7B-Instruct --adapter_name_or_path /output/my_task \\
        --dataset my_test --dataset_dir data --save_name runs/test/predictions.jsonl
    vlmtune predict predict.yaml batch_size=16                        # the same keys in a YAML
    vlmtune predict ... --infer_backend vllm --vllm_config '{"tensor_parallel_size": 4}'

The flags are those of LLaMA-Factory's batch-inference script (`scripts/vllm_infer.py`) and its generating keys,
with safer defaults: greedy decoding (LLaMA-Factory samples at temperature 0.95), and label scoring (`--mode
score`) whenever the answers form a small closed set or `--labels` is given: P(label) for every candidate label,
`predict` = the most probable label, no invalid answers. `--mode generate` (or `--predict_with_generate`) writes
the generated text instead. See `vlmtune/infer/predict.py` for the output and resuming after a crash.

On a machine with several GPUs this starts torchrun itself, one process per GPU (vLLM: per tensor_parallel_size
GPUs, one engine each), each predicting its share of the dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from vlmtune import allocator
from vlmtune.commands.options import (add_config_arguments, add_config_options, add_options, command_parser,
                                      config_values, given_options, typed_options)
from vlmtune.config import Config, PredictConfig, build_config
from vlmtune.errors import VlmtuneError
from vlmtune.infer.predict import PredictArgs, backend_of, predict
from vlmtune.launch import rank_and_world, relaunch_under_torchrun, torchrun_processes, visible_gpus

# Keys of the run config that are also flags (the rest can go in the YAML or as key=value).
CONFIG_FLAGS = ("model_name_or_path", "adapter_name_or_path", "template", "enable_thinking", "dataset", "dataset_dir",
                "media_dir", "max_samples", "image_max_pixels", "image_min_pixels", "labels", "positive_label",
                "default_system", "seed", "cutoff_len", "attn_implementation", "cache_dir", "quantization_bit",
                "bf16", "fp16", "skip_bad_records")
GENERATE_FLAGS = tuple(f.name for f in dataclasses.fields(PredictConfig))
OWN_FLAGS = tuple(f.name for f in dataclasses.fields(PredictArgs))
# An older spelling: `--backend transformers|vllm` (and `backend:` in a predict YAML) is infer_backend.
ALIASES = {"infer_backend": ["--infer_backend", "--backend"]}


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("predict", __doc__)
    add_config_arguments(parser, "a training YAML's keys are accepted")
    add_config_options(parser.add_argument_group("model and data"), CONFIG_FLAGS)
    add_options(parser.add_argument_group("answers (the predict keys of docs/config.md)"), PredictConfig,
                flags=ALIASES)
    add_options(parser.add_argument_group("this run"), PredictArgs)
    return parser


def parse_args(argv: list[str]) -> tuple[Config, PredictArgs, set[str]]:
    """(run config, prediction settings, keys the user set explicitly) from YAML + overrides + flags."""
    args = build_parser().parse_args(argv)
    flags = given_options(args, (*CONFIG_FLAGS, *GENERATE_FLAGS, *OWN_FLAGS))
    values, origin = config_values(args.config, args.overrides, flags)
    if "backend" in values:
        values.setdefault("infer_backend", values.pop("backend"))
    if "vllm_config" in values:
        values["vllm_config"] = vllm_config(values["vllm_config"], origin)
    pargs = PredictArgs(**typed_options(PredictArgs, {k: v for k, v in values.items() if k in OWN_FLAGS}, origin))
    pargs.check(origin)
    cfg = build_config({k: v for k, v in values.items() if k not in OWN_FLAGS}, origin)
    return cfg, pargs, set(values)


def vllm_config(value: Any, origin: str) -> dict:
    """vllm.LLM's extra arguments: a JSON object (or a YAML mapping), null for none."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        parsed = ...
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise VlmtuneError(f"{origin}: 'vllm_config' must be a JSON object such as '{{\"tensor_parallel_size\": 4}}', "
                           f"got {value!r}")
    return parsed


def main(argv: list[str]) -> int:
    cfg, pargs, explicit = parse_args(argv)
    if rank_and_world()[1] == 1:
        # vLLM: one engine per tensor_parallel_size GPUs (infer/predict.py `rank_device`)
        per_engine = int(pargs.vllm_config.get("tensor_parallel_size", 1)) if backend_of(cfg) == "vllm" else 1
        processes = torchrun_processes(False, visible_gpus() // max(1, per_engine), os.environ)
        if processes is not None:  # several GPUs: one process per GPU (or engine), each its share of the dataset
            relaunch_under_torchrun("predict", argv, processes)
    allocator.for_prediction()  # before torch allocates: see vlmtune/allocator.py
    predict(cfg, pargs, explicit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
