"""`vlmtune api`: an OpenAI-compatible HTTP API for the model, with label probabilities.

    VLMTUNE_API_KEY=secret vlmtune api --model_name_or_path /data/Qwen2.5-VL-7B-Instruct \\
        --adapter_name_or_path /output/my_task --labels 满足要求,不满足要求 --port 8000

Endpoints, vlmtune's additions to a request and a response, and what is safe by default: `vlmtune/serve/api.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field

from vlmtune import allocator
from vlmtune.commands.options import add_options, build_options, command_parser
from vlmtune.commands.serving import add_server_options, server_settings
from vlmtune.errors import VlmtuneError
from vlmtune.serve.api import API_KEY_ENV
from vlmtune.serve.common import LIMIT_FLAGS, Limits

PORT = 8000
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# Every Limits field is a flag but chars_per_token, a rule of thumb rather than a setting.
LIMIT_NAMES = tuple(f.name for f in dataclasses.fields(Limits) if f.name != "chars_per_token")


@dataclass
class ApiArgs:
    """How the API answers and what it accepts."""

    served_model_name: str | None = field(default=None, metadata={
        "help": "The model id /v1/models lists and responses carry (default: the adapter's or model's directory "
                "name)."})
    mode: str = field(default="generate", metadata={
        "help": "How a request without vlmtune_mode is answered: generate, or score (needs --labels)."})
    allow_local_images: bool = field(default=False, metadata={
        "help": "Also accept file:// URLs and absolute paths (files the server process can read)."})
    allow_remote_images: bool = field(default=False, metadata={
        "help": "Also accept http(s) image URLs (the server fetches them: only where the server may reach every "
                "address a client names)."})
    log_level: str = field(default="info", metadata={"help": f"uvicorn's log level: {', '.join(LOG_LEVELS)}."})

    def check(self, labels) -> None:
        if self.mode not in ("score", "generate"):
            raise VlmtuneError(f"--mode must be score or generate, got {self.mode!r}")
        if self.mode == "score" and not labels:
            raise VlmtuneError("--mode score needs --labels (the closed label set to score)")
        if self.log_level not in LOG_LEVELS:
            raise VlmtuneError(f"--log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("api", __doc__)
    add_server_options(parser, PORT)
    add_options(parser.add_argument_group("answers and requests"), ApiArgs)
    bounds = parser.add_argument_group("request limits (a request above one gets a 400 before the work it bounds; "
                                       "defaults for a 7B model on one GPU)")
    add_options(bounds, Limits, LIMIT_NAMES, flags={k: [f"--{v}"] for k, v in LIMIT_FLAGS.items()})
    return parser


def api_key_from_env() -> str | None:
    """The key clients must send, or None (no key required); a key set but blank is refused: it would start the
    server open while its operator believes it guarded."""
    key = os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise VlmtuneError(f"{API_KEY_ENV} is set but empty: set it to the key clients must send, or unset it to "
                           f"serve without one")
    return key.strip() if key is not None else None  # as the header's token is compared: stripped


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    api_key = api_key_from_env()
    settings, labels = server_settings(args, PORT)
    api = build_options(ApiArgs, args)
    api.check(labels)
    limits = build_options(Limits, args, LIMIT_NAMES)
    limits.check(settings.max_new_tokens)
    allocator.for_serving()  # before torch allocates: see vlmtune/allocator.py
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError:
        raise VlmtuneError("`vlmtune api` needs FastAPI and uvicorn: pip install 'vlmtune[api]'") from None
    from vlmtune.serve.api import ImagePolicy, create_app, run_server
    from vlmtune.serve.common import ModelService, RequestError, check_port_free, is_loopback, model_label

    check_port_free(settings.host, settings.port)
    if not is_loopback(settings.host) and not api_key:
        print(f"warning: binding {settings.host} without {API_KEY_ENV}: anyone who can reach this address can use "
              f"the model", file=sys.stderr)
    try:
        service = ModelService.from_args(settings, labels)
    except RequestError as exc:
        raise VlmtuneError(f"--labels: {exc}") from None
    name = api.served_model_name or model_label(service.engine)
    policy = ImagePolicy(api.allow_local_images, api.allow_remote_images, limits)
    app = create_app(service, name, api_key, policy, api.mode, limits)
    sources = "data: URLs" + (", local files" if api.allow_local_images else "") + \
        (", http(s)" if api.allow_remote_images else "")
    print(f"vlmtune api: http://{settings.host}:{settings.port}/v1 serving '{name}' "
          f"(API key: {'required' if api_key else 'not required'}; labels: {', '.join(labels) if labels else 'none'}; "
          f"default mode: {api.mode}; images from {sources}; per request at most {limits.max_images} images, "
          f"{limits.max_request_pixels:,} pixels, {limits.max_prompt_tokens:,} prompt tokens, max_tokens "
          f"{limits.max_tokens})", flush=True)
    run_server(app, settings.host, settings.port, api.log_level)
    return 0
