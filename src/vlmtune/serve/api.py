"""`vlmtune api`: an OpenAI-compatible HTTP API for the model, with label probabilities.

    VLMTUNE_API_KEY=secret vlmtune api --model_name_or_path /data/Qwen2.5-VL-7B-Instruct \\
        --adapter_name_or_path /output/my_task --labels 满足要求,不满足要求 --port 8000

Endpoints (OpenAI's shapes, so the official clients work unchanged):

- `POST /v1/chat/completions`: `messages` with `system` (optional), `user` and `assistant` turns; user
  content is a string or a list of `{"type": "text", "text": ...}` and
  `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` parts. Images go where
  their parts are, or — when the text carries exactly as many `<image>` placeholders as the message
  has image parts (the dataset's own prompt) — where the placeholders are. Honoured parameters:
  `temperature` (default 0: greedy), `max_tokens` / `max_completion_tokens`, `seed`, `stop`, `stream`
  (SSE chunks ending with `data: [DONE]`; sent once the answer is complete — answers are a few
  tokens), `stream_options.include_usage`, and in score mode `logprobs` / `top_logprobs` (the answer label as
  the token, with each label's log-probability: `label_logprobs`). `n` must be 1. Parameters this server
  cannot honour — tools and functions, a response_format other than text, top_p, penalties, logit_bias — are a
  400 naming the field (`refuse_unsupported`); their neutral values are accepted, as are other OpenAI fields that
  change nothing in an answer (`user`, `metadata`, ...).
- `GET /v1/models`: the one served model.

vlmtune's additions to a request (`extra_body=` in the OpenAI Python client):

- `"vlmtune_mode": "score"` answers by label scoring: the most probable label of the closed label
  set, never an invalid answer. `"generate"` decodes text. Default: `--mode` (generate).
- `"vlmtune_labels": ["a", "b"]`: score these candidate labels instead of `--labels`.
- `"vlmtune_scores": false`: in generate mode, skip the label probabilities (one model pass less).

and to the response — a top-level `vlmtune` object (in the last chunk when streaming):

    "vlmtune": {"mode": "score", "scores": {"满足要求": 0.93, "不满足要求": 0.07}}

`scores` is P(label | prompt) for every label (summing to 1; null without a label set, or in generate
mode with `vlmtune_scores: false`); with the
OpenAI client read it as `completion.model_extra["vlmtune"]["scores"]`.

Safe by default: binds 127.0.0.1; when the environment variable `VLMTUNE_API_KEY` is set every
request needs `Authorization: Bearer <key>` (401 otherwise); bodies over `--max_request_bytes`
get 413; images come only from `data:` URLs unless `--allow_local_images` (`file://` URLs and
absolute paths) or `--allow_remote_images` (http/https) is given. Every error is a JSON body in
OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx status — a 500 only for
a bug, without a traceback — and the server keeps serving; a number of thousands of digits or text with a lone
surrogate is a 400 naming its field. `VLMTUNE_API_KEY` set but empty is refused at start (`commands/api.py`).
The model is loaded once; one lock serialises model calls.

What one request may cost is bounded before the work (`serve.common.Limits`; a 400 naming the flag): labels
(`--max_labels`, `--max_label_chars`), images (`--max_images`, `--max_image_pixels` and `--max_image_bytes` —
what decoding holds — read from each header, `--max_request_pixels` for all together, checked before any image is
decoded; images are then decoded one at a time and freed once resized), prompt tokens (`--max_prompt_tokens`) and
max_tokens (`--max_tokens_limit`, and the model's context). A client that disconnects abandons its request: dropped
if it is still queued, generation stopped at the next token.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and
# `Request` is imported inside create_app (the module imports without FastAPI installed).
import asyncio
import dataclasses
import hmac
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Annotated, Literal, Union

from vlmtune.data.conversation import IMAGE_PLACEHOLDER, Message
from vlmtune.errors import VlmtuneError
from vlmtune.files import file_url_path
from vlmtune.serve.common import (Answer, Cancelled, Limits, ModelService, OutOfMemory, RequestError, decode_data_url,
                                  open_image)

API_KEY_ENV = "VLMTUNE_API_KEY"
MAX_DRAIN_BYTES = 64 * 1024 * 1024  # read (and drop) at most this much of an oversize body before answering 413
REMOTE_TIMEOUT_S = 15
DISCONNECT_POLL_S = 0.2  # how often a request in progress checks that its client is still there
SEED_RANGE = (-(2**63), 2**63 - 1)  # torch's generator seed is a 64-bit integer
log = logging.getLogger("vlmtune.api")


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Request schema (pydantic). Unknown top-level fields are ignored, as OpenAI-compatible servers do.


def _schema():
    """Build the pydantic models lazily, so `vlmtune api --help` needs no pydantic import."""
    from pydantic import BaseModel, ConfigDict, Field

    class ImageURL(BaseModel):
        model_config = ConfigDict(extra="ignore")
        url: str
        detail: str | None = None

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="ignore")
        type: Literal["text"]
        text: str

    class ImagePart(BaseModel):
        model_config = ConfigDict(extra="ignore")
        type: Literal["image_url"]
        image_url: Union[ImageURL, str]

    Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[str, list[Part], None] = None

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore")
        include_usage: bool = False

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        messages: list[ChatMessage] = Field(min_length=1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        temperature: float | None = Field(default=None, ge=0, le=2)
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
        n: int = Field(default=1, ge=1, le=1)
        stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None
        vlmtune_mode: Literal["score", "generate"] | None = None
        vlmtune_labels: list[str] | None = Field(default=None, min_length=2)
        vlmtune_scores: bool = True
        # OpenAI parameters read only to refuse what cannot be honoured (`refuse_unsupported`), or, for logprobs,
        # honoured in score mode (`label_logprobs`).
        logprobs: bool | None = None
        top_logprobs: int | None = Field(default=None, ge=0, le=20)
        tools: list | None = None
        functions: list | None = None
        tool_choice: Union[str, dict, None] = None
        function_call: Union[str, dict, None] = None
        response_format: dict | None = None
        top_p: float | None = Field(default=None, ge=0, le=1)
        presence_penalty: float | None = Field(default=None, ge=-2, le=2)
        frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
        logit_bias: dict[str, float] | None = None

    return ChatRequest


# An integer longer than this in a request body is kept as a HugeNumber: no field takes one (a seed has at most 20
# digits), and Python refuses to convert one of more than 4,300 digits.
MAX_NUMBER_DIGITS = 64


class HugeNumber:
    """An integer of more than MAX_NUMBER_DIGITS digits in a request body: validation then names its field."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))


def parse_int(text: str):
    """json.loads' parse_int: an int, or a HugeNumber for one too long to convert."""
    return int(text) if len(text) <= MAX_NUMBER_DIGITS else HugeNumber(text)


def find_unencodable(value) -> str | None:
    """Where (`messages[0].content`) the first string — a value or a key — is not Unicode text UTF-8 can encode (a
    lone surrogate such as `\\ud800`, which JSON's escapes allow); None when every string is."""
    stack = [("", value)]
    while stack:
        where, value = stack.pop()
        items = []
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "request body"
        elif isinstance(value, dict):
            items = [(f"{where}.{key}" if where else str(key), item) for key, item in value.items()]
            items += [(f"{where}.{key}" if where else "key", key) for key in value if isinstance(key, str)]
        elif isinstance(value, list):
            items = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
        stack.extend(reversed(items))
    return None


NOT_A_TOOL_SERVER = "this server calls no tools or functions: it answers with text (a label in score mode)"


def refuse_unsupported(req, mode: str) -> None:
    """OpenAI parameters this server cannot honour get a 400 naming the field, never silently ignored; their neutral
    values (null, [], "none", 0, {"type": "text"}) are accepted. logprobs is honoured in score mode."""
    response_type = (req.response_format or {}).get("type", "text")
    problems = [
        ("tools", bool(req.tools), NOT_A_TOOL_SERVER),
        ("functions", bool(req.functions), NOT_A_TOOL_SERVER),
        ("tool_choice", req.tool_choice not in (None, "none", "auto"), NOT_A_TOOL_SERVER),
        ("function_call", req.function_call not in (None, "none", "auto"), NOT_A_TOOL_SERVER),
        ("response_format", response_type != "text",
         f"{response_type!r} is not supported: answers are plain text (in score mode exactly one of the labels)"),
        ("top_p", req.top_p not in (None, 1), "not supported (only 1): sampling is by temperature alone"),
        ("presence_penalty", bool(req.presence_penalty), "not supported (only 0): answers are a few tokens"),
        ("frequency_penalty", bool(req.frequency_penalty), "not supported (only 0): answers are a few tokens"),
        ("logit_bias", bool(req.logit_bias), "not supported (only {})"),
        ("logprobs", bool(req.logprobs) and mode != "score",
         "given in score mode only (\"vlmtune_mode\": \"score\"): the answer label and every label's log-probability"),
        ("top_logprobs", bool(req.top_logprobs) and not req.logprobs, "needs \"logprobs\": true"),
    ]
    for name, refused, why in problems:
        if refused:
            raise ApiError(400, f"{name}: {why}", code="unsupported_parameter", param=name)


def describe_validation_error(exc) -> tuple[str, str]:
    """The most specific of pydantic's errors as (`messages[0].content[1].image_url`, message).

    A union (content: string or list of parts) fails in every branch; the deepest location is the one
    the client got wrong, and pydantic's branch names (`str`, `list[...]`, class names) are dropped.
    """
    errors = exc.errors()
    best = max(errors, key=lambda e: len(e.get("loc", ())))
    where, previous = "", None
    for part in best.get("loc", ()):
        if isinstance(part, int):
            where += f"[{part}]"
        elif part in BRANCH_NAMES or "[" in str(part) or "-" in str(part) or part == previous:
            continue  # a union branch, or a discriminated union's tag before the field of the same name
        else:
            where += f".{part}" if where else str(part)
        previous = part
    if isinstance(best.get("input"), HugeNumber):
        return where, f"a number of {best['input'].digits:,} digits is not accepted"
    return where, str(best.get("msg", "invalid value"))


BRANCH_NAMES = {"str", "int", "float", "bool", "none", "list", "dict", "TextPart", "ImagePart", "ImageURL",
                "ChatMessage", "StreamOptions"}


# ---------------------------------------------------------------------------------------------
# Messages and images


class ImagePolicy:
    """Where images may come from: data: URLs always; local files and http(s) only when allowed."""

    def __init__(self, allow_local: bool = False, allow_remote: bool = False, limits: Limits | None = None):
        self.allow_local, self.allow_remote, self.limits = allow_local, allow_remote, limits or Limits()
        self.max_bytes = self.limits.max_request_bytes

    def open(self, url: str, where: str):
        """The image at `url`, opened lazily (header read and size checked, pixels not decoded)."""
        url = url.strip()
        if url.startswith("data:"):
            return decode_data_url(url, where, self.limits)
        lowered = url.lower()
        if lowered.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise RequestError(f"{where}: http(s) image URLs are disabled on this server; send the image as a "
                                   f"data: URL (data:image/png;base64,...) or start it with --allow_remote_images")
            return self._fetch(url, where)
        if lowered.startswith("file://") or url.startswith("/"):
            if not self.allow_local:
                raise RequestError(f"{where}: local image paths are disabled on this server; send the image as a "
                                   f"data: URL (data:image/png;base64,...) or start it with --allow_local_images")
            path = Path(file_url_path(url) if lowered.startswith("file://") else url)
            try:
                raw = path.read_bytes()
            except (OSError, ValueError) as exc:
                raise RequestError(f"{where}: cannot read {path} ({getattr(exc, 'strerror', None) or exc.__class__.__name__})") from None
            return open_image(raw, where, self.limits)
        raise RequestError(f"{where}: unsupported image URL (expected a data: URL such as data:image/png;base64,...)")

    def _fetch(self, url: str, where: str):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "vlmtune"}),
                                        timeout=REMOTE_TIMEOUT_S) as response:
                raw = response.read(self.max_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RequestError(f"{where}: cannot fetch the image ({getattr(exc, 'reason', exc)})") from None
        if len(raw) > self.max_bytes:
            raise RequestError(f"{where}: the image is larger than {self.max_bytes} bytes")
        return open_image(raw, where, self.limits)


@dataclasses.dataclass
class RequestImage:
    """One image of a request, opened lazily, and where it is in the request (for messages)."""

    image: object  # a PIL image whose pixels are not decoded yet
    where: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def convert_messages(messages, policy: ImagePolicy, limits: Limits | None = None) -> tuple[list[Message], list]:
    """OpenAI messages → vlmtune Messages with `<image>` placeholders, and the request's images in order
    (RequestImage: opened, not decoded). The image count and their total pixels are checked before any
    image is decoded."""
    limits = limits or Limits()
    roles = ["system" if m.role == "developer" else m.role for m in messages]
    # The structure first: no image is opened for a request that cannot be answered anyway.
    if "system" in roles[1:]:
        raise RequestError("messages: a system message is only accepted first")
    if roles[-1] != "user":
        raise RequestError("messages: the last message must have role 'user'")
    n_images = sum(1 for m in messages if not isinstance(m.content, (str, type(None)))
                   for part in m.content if part.type == "image_url")
    if n_images > limits.max_images:
        raise RequestError(f"messages: {n_images} images, more than this server takes per request "
                           f"({limits.max_images}; --max_images)")
    limits.check_text(messages)
    out: list[Message] = []
    images: list[RequestImage] = []
    for i, (role, message) in enumerate(zip(roles, messages)):
        content = message.content
        if content is None:
            content = ""
        if isinstance(content, str):
            if IMAGE_PLACEHOLDER in content:
                raise RequestError(f"messages[{i}].content: contains {IMAGE_PLACEHOLDER} but no image part; send "
                                   f"images as image_url parts")
            out.append(Message(role, content))
            continue
        texts = [part.text for part in content if part.type == "text"]
        image_parts = [(j, part) for j, part in enumerate(content) if part.type == "image_url"]
        if image_parts and role != "user":
            raise RequestError(f"messages[{i}]: images are only accepted in user messages")
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for text in texts)
        if placeholders and placeholders != len(image_parts):
            raise RequestError(f"messages[{i}].content: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the "
                               f"text but {len(image_parts)} image part(s)")
        pieces = []
        for j, part in enumerate(content):
            if part.type == "text":
                pieces.append(part.text)
                continue
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            where = f"messages[{i}].content[{j}].image_url"
            images.append(RequestImage(policy.open(url, where), where))
            if not placeholders:
                pieces.append(IMAGE_PLACEHOLDER)
        out.append(Message(role, "".join(pieces)))
    total = sum(w * h for w, h in (image.size for image in images))
    if total > limits.max_request_pixels:
        for image in images:
            image.image.close()
        raise RequestError(f"messages: the images have {total:,} pixels in all, more than this server decodes per "
                           f"request ({limits.max_request_pixels:,}; --max_request_pixels)")
    return out, images


# ---------------------------------------------------------------------------------------------
# Responses


def apply_stop(text: str, stop) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def label_logprobs(answer: Answer, top: int | None) -> dict:
    """OpenAI's `logprobs` of a scored answer: one entry, the answer label as its token, with log P(label); in its
    `top_logprobs` the `top` most probable labels (P as in `vlmtune.scores`, summing to 1 over the labels)."""
    def entry(label: str, p: float) -> dict:
        return {"token": label, "logprob": math.log(p) if p > 0 else -9999.0, "bytes": list(label.encode())}

    ranked = sorted(answer.scores.items(), key=lambda item: -item[1])
    return {"content": [{**entry(answer.text, answer.scores[answer.text]),
                         "top_logprobs": [entry(label, p) for label, p in ranked[:top or 0]]}], "refusal": None}


def completion_body(answer: Answer, text: str, finish: str, model: str, request_id: str, created: int,
                    logprobs: dict | None = None) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                     "finish_reason": finish}],
        "usage": usage(answer),
        "vlmtune": {"mode": answer.mode, "scores": answer.scores},
    }


def usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


def stream_events(answer: Answer, text: str, finish: str, model: str, request_id: str, created: int,
                  include_usage: bool, logprobs: dict | None = None):
    """SSE lines: role, content (+ logprobs), finish (+ vlmtune scores), optional usage chunk, [DONE]."""
    def chunk(delta: dict, finish_reason=None, logprobs=None, **extra) -> str:
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
                **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    if text:
        yield chunk({"content": text}, logprobs=logprobs)
    yield chunk({}, finish, vlmtune={"mode": answer.mode, "scores": answer.scores})
    if include_usage:
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": usage(answer)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# The app


async def watch_disconnect(request, cancelled: threading.Event) -> None:
    """Set `cancelled` when the client goes away (the model thread then drops or stops the request)."""
    while not cancelled.is_set():
        if await request.is_disconnected():
            cancelled.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def create_app(service: ModelService, model_name: str, api_key: str | None = None, policy: ImagePolicy | None = None,
               default_mode: str = "generate", limits: Limits | None = None):
    """The FastAPI app around a loaded ModelService (tests build it in-process too)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    ChatRequest = _schema()
    limits = limits or Limits()
    policy = policy or ImagePolicy(limits=limits)
    max_request_bytes = limits.max_request_bytes
    # Images are decoded one request at a time: with the server's thread pool, concurrent requests would
    # otherwise each hold their full-size images at once.
    decoding = threading.Lock()
    created_at = int(time.time())
    app = FastAPI(title="vlmtune", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_, code=str(exc.status_code)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(str(exc), "invalid_request_error", "invalid_request"), status_code=400)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("internal error while answering %s", request.url.path)
        return JSONResponse(error_body("internal server error (details are in the server log)", "server_error",
                                       "internal_error"), status_code=500)

    def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        too_big = ApiError(413, f"request body larger than {max_request_bytes} bytes (this server's "
                                f"--max_request_bytes)", "invalid_request_error", "request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                raise ApiError(400, "invalid Content-Length header") from None
        body = bytearray()
        over = declared is not None and declared_n > max_request_bytes
        received = 0
        # An oversize body is read and dropped (up to a bound) before answering, so the client gets the
        # 413 instead of a connection reset in the middle of its upload.
        async for piece in request.stream():
            received += len(piece)
            if received > max_request_bytes:
                over = True
                body = bytearray()
            if over:
                if received > MAX_DRAIN_BYTES:
                    break
                continue
            body += piece
        if over:
            raise too_big
        return bytes(body)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created_at,
                                            "owned_by": "vlmtune"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await read_body(request)
        try:
            payload = json.loads(raw, parse_int=parse_int)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON ({exc})", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "request body is JSON nested too deeply", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_request")
        try:
            req = ChatRequest.model_validate(payload)
        except ValidationError as exc:
            where, message = describe_validation_error(exc)
            raise ApiError(400, f"{where}: {message}" if where else message, code="invalid_request",
                           param=where or None) from None
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply", code="invalid_request") from None
        where = find_unencodable(req.model_dump(exclude_none=True))
        if where:
            raise ApiError(400, f"{where}: text with a lone surrogate (\\ud800-\\udfff), which is not valid Unicode",
                           code="invalid_request", param=where)
        mode = req.vlmtune_mode or default_mode
        refuse_unsupported(req, mode)
        cancelled = threading.Event()

        def work():
            # Every bound is checked before the work it bounds: labels and max_tokens here, the image count,
            # text length and total pixels before any image is decoded, the prompt's tokens before the model.
            limits.check_labels(req.vlmtune_labels)
            limits.check_max_tokens(req.max_tokens, "max_tokens")
            limits.check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
            with decoding:
                messages, opened = convert_messages(req.messages, policy, limits)
                images = []
                for image in opened:
                    if cancelled.is_set():
                        raise Cancelled("the client disconnected")
                    images.append(service.prepare_image(image.image, image.where))
            return service.answer(messages, images, mode=mode, labels=req.vlmtune_labels,
                                  max_new_tokens=req.max_completion_tokens or req.max_tokens,
                                  temperature=req.temperature or 0.0, seed=req.seed,
                                  with_scores=req.vlmtune_scores, max_prompt_tokens=limits.max_prompt_tokens,
                                  cancelled=cancelled)

        watcher = asyncio.ensure_future(watch_disconnect(request, cancelled))
        try:
            answer = await run_in_threadpool(work)
        except Cancelled as exc:
            log.info("abandoned a request: %s", exc)
            raise ApiError(499, str(exc), code="client_closed_request") from None
        except OutOfMemory as exc:
            raise ApiError(503, str(exc), "server_error", code="out_of_memory") from None
        except RequestError as exc:
            raise ApiError(400, str(exc), code="invalid_request") from None
        finally:
            watcher.cancel()
        text, stopped = apply_stop(answer.text, req.stop)
        finish = "stop" if stopped else answer.finish_reason
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        logprobs = label_logprobs(answer, req.top_logprobs) if req.logprobs else None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(answer, text, finish, model_name, request_id, created, include_usage,
                                                   logprobs),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return completion_body(answer, text, finish, model_name, request_id, created, logprobs)

    return app


# ---------------------------------------------------------------------------------------------
# Running it


def run_server(app, host: str, port: int, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted; a server that could not start is a one-line error."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, log_level.upper()))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=True,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        pass
    if not server.started:
        raise VlmtuneError(f"the server did not start on {host}:{port} (see the messages above)")
