"""`vlmtune webui`: try the model by hand — drop an image, read the answer and the label probabilities.

    vlmtune webui --model_name_or_path /data/Qwen2.5-VL-7B-Instruct --adapter_name_or_path /output/my_task \\
        --dataset my_dataset --dataset_dir data           # prompt box pre-filled with the dataset's rules
    VLMTUNE_WEBUI_AUTH=user:password vlmtune webui ... --labels 满足要求,不满足要求 --host 0.0.0.0 --port 7860

With VLMTUNE_WEBUI_AUTH set the page asks for that login first (every route, uploads included, answers 401
until then); binding another address than localhost without it prints a warning.

What the page shows and how it serves: `vlmtune/serve/webui.py`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from vlmtune.commands.options import (add_config_options, add_options, build_options, command_parser, config_values,
                                      given_options)
from vlmtune.commands.serving import add_server_options, server_settings
from vlmtune.config import build_config
from vlmtune.errors import VlmtuneError
from vlmtune.serve.common import LIMIT_FLAGS, Limits
from vlmtune.serve.webui import AUTH_ENV, PAGE_LIMITS

PORT = 7860
PAGE_FLAGS = ("dataset", "dataset_dir")


@dataclass
class PageArgs:
    """What the page starts with."""

    prompt: str | None = field(default=None, metadata={"help": "Initial prompt text (instead of a dataset's)."})


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("webui", __doc__)
    add_server_options(parser, PORT)
    page = parser.add_argument_group("page")
    add_config_options(page, PAGE_FLAGS)
    add_options(page, PageArgs)
    bounds = parser.add_argument_group("request limits (as `vlmtune api`'s: a request above one gets an error before "
                                       "the work it bounds)")
    add_options(bounds, Limits, PAGE_LIMITS, flags={k: [f"--{v}"] for k, v in LIMIT_FLAGS.items()})
    return parser


def auth_from_env() -> tuple[str, str] | None:
    """(user, password) from AUTH_ENV, or None (no login); set but blank or without both parts is refused: the
    page would start open while its operator believes it guarded."""
    value = os.environ.get(AUTH_ENV)
    if value is None:
        return None
    user, colon, password = value.partition(":")
    if not colon or not user.strip() or not password:
        raise VlmtuneError(f"{AUTH_ENV} is set but is not user:password (both non-empty): set it so, or unset it to "
                           f"serve the page without a login")
    return user.strip(), password


def main(argv: list[str]) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    auth = auth_from_env()
    settings, labels = server_settings(args, PORT)
    limits = build_options(Limits, args, PAGE_LIMITS)
    limits.check(settings.max_new_tokens)
    from vlmtune.serve.common import ModelService, RequestError, check_port_free
    from vlmtune.serve.webui import PageDefaults, dataset_defaults, launch_page

    check_port_free(settings.host, settings.port)
    data = build_config(*config_values(args.config, args.overrides, given_options(args, PAGE_FLAGS))).data
    defaults = dataset_defaults(data.dataset, data.dataset_dir) if data.dataset else PageDefaults()
    prompt = build_options(PageArgs, args).prompt
    if prompt is not None:
        defaults.prompt = prompt
    if settings.default_system and not defaults.system:
        defaults.system = settings.default_system
    labels = labels or defaults.labels
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        raise VlmtuneError("`vlmtune webui` needs Gradio: pip install 'vlmtune[webui]'") from None
    try:
        service = ModelService.from_args(settings, labels)
    except RequestError as exc:
        raise VlmtuneError(f"--labels: {exc}") from None
    launch_page(service, defaults, settings.host, settings.port, limits, auth)
    return 0
