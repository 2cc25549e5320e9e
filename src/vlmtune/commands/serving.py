"""What `vlmtune webui` and `vlmtune api` share on the command line: the model (the config's keys), where to run
it and where to listen. The model keys may also come from a YAML — LLaMA-Factory's inference YAML
(`llamafactory-cli api|webchat examples/inference/qwen2_5vl.yaml`) works unchanged — with `key=value` overrides;
flags override both."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from vlmtune.commands.options import (add_config_arguments, add_config_options, add_options, build_options,
                                      config_values, given_options)
from vlmtune.config import build_config
from vlmtune.labels import parse_labels

MODEL_FLAGS = ("model_name_or_path", "adapter_name_or_path", "image_max_pixels", "image_min_pixels", "bf16", "fp16",
               "attn_implementation", "labels", "default_system", "max_new_tokens", "template", "enable_thinking")
SERVER_DEFAULTS = {"max_new_tokens": 128}  # the answer limit of a request that sets none


@dataclass
class ServerArgs:
    """Where the model runs and where the server listens."""

    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 (default: cuda when available)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (127.0.0.1: this machine only)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})


def add_server_options(parser: argparse.ArgumentParser, port: int) -> None:
    add_config_arguments(parser, "the model keys below, e.g. LLaMA-Factory's inference YAML")
    add_config_options(parser.add_argument_group("model"), MODEL_FLAGS, defaults=SERVER_DEFAULTS)
    add_options(parser.add_argument_group("server"), ServerArgs, defaults={"port": port})


def server_settings(args: argparse.Namespace, port: int) -> tuple[argparse.Namespace, list[str] | None]:
    """(settings for `ModelService.from_args`, label set): the model keys typed and checked by the config's rules
    (pixel limits None unless given: the adapter's then), the label set by `vlmtune.labels`'s."""
    given, origin = config_values(args.config, args.overrides, given_options(args, MODEL_FLAGS))
    labels = parse_labels(given.pop("labels", None), "--labels" if origin == "command line" else f"{origin}: labels")
    cfg = build_config(given, origin)
    if cfg.predict.infer_backend == "vllm":
        print(f"note: {origin}: infer_backend: vllm — this server runs the model with transformers (vLLM serves "
              f"batch prediction: `vlmtune predict --backend vllm`, or `vllm serve` an exported model)",
              file=sys.stderr, flush=True)
    server = build_options(ServerArgs, args, defaults={"port": port})
    settings = argparse.Namespace(
        model_name_or_path=cfg.model.model_name_or_path, adapter_name_or_path=cfg.model.adapter_name_or_path,
        image_max_pixels=cfg.model.image_max_pixels if "image_max_pixels" in given else None,
        image_min_pixels=cfg.model.image_min_pixels if "image_min_pixels" in given else None,
        bf16=cfg.train.bf16, fp16=cfg.train.fp16, attn_implementation=cfg.model.attn_implementation,
        default_system=cfg.data.default_system, template=cfg.data.template,
        enable_thinking=cfg.data.enable_thinking if "enable_thinking" in given else None,
        max_new_tokens=cfg.predict.max_new_tokens if "max_new_tokens" in given else SERVER_DEFAULTS["max_new_tokens"],
        device=server.device, host=server.host, port=server.port)
    return settings, labels
