"""What the web UI and the API share: the model loaded once behind a lock, images from uploads, answers.

An answer comes one of two ways:

- **score** (closed label sets): P(label | prompt) for every candidate label from one teacher-forced
  pass (`infer.scoring`); the answer is the most probable label. No invalid answers, and the
  probabilities come with it.
- **generate**: greedy decoding by default (temperature 0), sampling with a seed when asked.

With a label set configured, the probabilities are computed in both modes (two small forward passes),
so a client that generates still sees how sure the model is.

Images sent to the API never touch the disk: they are decoded from bytes, converted to RGB and
resized exactly as training resizes files (`data.images.load_resized`: as viewed, EXIF orientation applied and
transparency composited on white), and
handed to scoring/generation as tensors. The web page reads the uploaded file with `load_resized`
itself.

torch on a CPU is not made for concurrent calls on one model, so every model call holds one lock and
runs on one dedicated thread (requests queue): web servers call from a pool of threads, and each
thread that calls torch would get its own OpenMP team — dozens of them on two cores.
"""

from __future__ import annotations

import base64
import binascii
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from PIL import Image

from vlmtune.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message
from vlmtune.errors import VlmtuneError

if TYPE_CHECKING:
    import torch

    from vlmtune.infer.engine import Engine

# Decoding a huge image costs memory before any resize: refuse above this many pixels (≈ 8k × 8k).
MAX_IMAGE_PIXELS = 64_000_000
MODES = ("score", "generate")


class RequestError(ValueError):
    """A problem with one request (bad image, placeholder count, unknown label): the client's fault."""


class Cancelled(RequestError):
    """The client went away before its answer was ready: the work was abandoned."""


# ---------------------------------------------------------------------------------------------
# Where the servers listen


def check_port_free(host: str, port: int) -> None:
    """Fail in a second, before the (slow) model load, when the address is taken or invalid."""
    if not 0 < port < 65536:
        raise VlmtuneError(f"--port {port} is not a valid port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise VlmtuneError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise VlmtuneError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


# ---------------------------------------------------------------------------------------------
# Images


def open_image_bytes(raw: bytes, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Image bytes (any format Pillow reads) → a PIL image opened lazily: its header read and its size
    checked against `max_pixels`, its pixels not decoded yet (`resize_image` does, one image at a time, so
    a request's images are never all decoded at once). RequestError if it is not an image or too large."""
    from vlmtune.data.images import ImageError, open_header

    if not raw:
        raise RequestError(f"{what}: empty image data")
    try:
        image = open_header(io.BytesIO(raw))
    except ImageError as exc:
        raise RequestError(f"{what}: {str(exc).replace('unreadable image', 'not a readable image')}") from None
    if image.width * image.height > max_pixels:
        image.close()
        raise RequestError(f"{what}: {image.width}×{image.height} pixels is more than this server decodes per "
                           f"image ({max_pixels:,}; --max_image_pixels)")
    return image


def decode_data_url(url: str, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """`data:image/png;base64,....` → PIL image, opened lazily (`open_image_bytes`). Only base64 data URLs
    carry binary images sensibly."""
    if not url.startswith("data:"):
        raise RequestError(f"{what}: not a data: URL")
    header, sep, data = url[5:].partition(",")
    if not sep:
        raise RequestError(f"{what}: malformed data: URL (no comma before the data)")
    params = header.split(";")
    if "base64" not in params[1:]:
        raise RequestError(f"{what}: data: URL must be base64 encoded (data:image/png;base64,...)")
    media_type = params[0].strip().lower()
    if media_type and not media_type.startswith("image/") and media_type != "application/octet-stream":
        raise RequestError(f"{what}: data: URL has media type {media_type!r}, expected image/*")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: data: URL is not valid base64") from None
    return open_image_bytes(raw, what, max_pixels)


def resize_image(image: Image.Image, settings, what: str = "image") -> "torch.Tensor":
    """A (lazily opened) PIL image → resized uint8 CHW tensor, exactly as `data.images.load_resized` does for
    files; the full-size pixels are freed as soon as the small copy exists."""
    from vlmtune.data.images import ImageError, decode_rgb, resize_decoded

    try:
        return resize_decoded(decode_rgb(image), settings)
    except ImageError as exc:  # truncated data, or smart_resize's extreme aspect ratio
        raise RequestError(f"{what}: {image.width}×{image.height} image cannot be used "
                           f"({str(exc).replace('unreadable image', 'not a readable image')})") from None
    finally:
        image.close()


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class Answer:
    text: str
    mode: str  # score | generate
    scores: dict[str, float] | None  # P(label) when a label set applies
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length
    seconds: float = 0.0
    image_tokens: list[int] = field(default_factory=list)


class ModelService:
    """The model, its processor, the label set and one lock; answers one conversation at a time."""

    def __init__(self, engine: "Engine", labels: Sequence[str] | None = None, default_system: str | None = None,
                 max_new_tokens: int = 128):
        self.engine = engine
        self.labels = list(labels) if labels else None
        self.default_system = default_system
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmtune-model")
        if self.labels:
            self.check_labels(self.labels)

    @classmethod
    def from_args(cls, args, labels: Sequence[str] | None = None, log=print) -> "ModelService":
        """From the servers' settings (an object with the attributes below: `commands/serving.py`)."""
        from vlmtune.infer.engine import load_engine

        engine = load_engine(args.model_name_or_path, args.adapter_name_or_path, args.image_max_pixels,
                             args.image_min_pixels, bf16=args.bf16, fp16=args.fp16,
                             attn_implementation=args.attn_implementation, device=args.device, log=log)
        return cls(engine, labels, args.default_system, args.max_new_tokens)

    @property
    def processor(self):
        return self.engine.processor

    def check_labels(self, labels: Sequence[str]) -> None:
        """Labels must be distinct after tokenisation and start at a token boundary (scoring's rules)."""
        from vlmtune.infer.scoring import label_token_ids

        try:
            label_token_ids(list(labels), self.processor)
        except ValueError as exc:
            raise RequestError(f"labels cannot be scored: {exc}") from None

    def prepare_image(self, image: Image.Image, what: str = "image") -> "torch.Tensor":
        return resize_image(image, self.processor.image_processor, what)

    @property
    def context_length(self) -> int | None:
        """The longest sequence the language model takes (prompt + answer), from its config."""
        config = getattr(self.engine.model, "config", None)
        for part in (getattr(config, "text_config", None), config):
            value = getattr(part, "max_position_embeddings", None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def prepare_file(self, path: str | Path) -> "torch.Tensor":
        """An image file, read exactly as training reads dataset images."""
        from vlmtune.data.images import ImageError, load_resized

        try:
            return load_resized(path, self.processor.image_processor)
        except ImageError as exc:
            raise RequestError(f"{Path(path).name}: {exc}") from None
        except ValueError as exc:  # smart_resize: extreme aspect ratio
            raise RequestError(f"{Path(path).name}: cannot be used ({exc})") from None

    def answer(self, messages: Sequence[Message], images: Sequence["torch.Tensor"], mode: str | None = None,
               labels: Sequence[str] | None = None, max_new_tokens: int | None = None, temperature: float = 0.0,
               seed: int | None = None, with_scores: bool = True, max_prompt_tokens: int | None = None,
               cancelled: threading.Event | None = None) -> Answer:
        """Answer the last user turn of `messages` (images in order of their `<image>` placeholders).

        mode None: score when a label set applies, else generate. `labels` overrides the server's set.
        with_scores False skips label scoring in generate mode (one model pass less). A prompt over
        `max_prompt_tokens`, or a prompt + max_new_tokens over the model's context, is refused before any
        model work. When `cancelled` is set (the client went away) a queued request is dropped and a
        generation stops at its next token; both raise Cancelled.
        """
        from vlmtune.data.encode import encode_prompt, image_tokens
        from vlmtune.infer.generation import generate_conversations
        from vlmtune.infer.scoring import score_conversations

        labels = list(labels) if labels else self.labels
        if labels is not self.labels:
            self.check_labels(labels)
        mode = mode or ("score" if labels else "generate")
        if mode not in MODES:
            raise RequestError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "score" and not labels:
            raise RequestError("score mode needs a closed label set (start the server with --labels a,b)")
        if not messages or messages[-1].role != "user":
            raise RequestError("the last message must be the user's")
        placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
        if placeholders != len(images):
            raise RequestError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
        max_new_tokens = max_new_tokens or self.max_new_tokens
        conversation = Conversation(list(messages), images=[f"<request image {i}>" for i in range(len(images))],
                                    source="request", index=0)
        images = list(images)
        try:
            prompt_tokens = len(encode_prompt(list(messages), images, self.processor, self.default_system))
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens:
            raise RequestError(f"the prompt is {prompt_tokens} tokens (text and image tokens), more than this server "
                               f"takes ({max_prompt_tokens}; --max_prompt_tokens)")
        context = self.context_length
        if mode == "generate" and context is not None and prompt_tokens + max_new_tokens > context:
            raise RequestError(f"max_tokens {max_new_tokens} + the prompt's {prompt_tokens} tokens exceed the model's "
                               f"context of {context} tokens")
        stop_now = cancelled.is_set if cancelled is not None else None

        def run() -> tuple[str, dict[str, float] | None]:
            with self.lock:
                if stop_now is not None and stop_now():  # the client left while this request queued
                    raise Cancelled("the client disconnected before the model started")
                scores = None
                if labels and (with_scores or mode == "score"):
                    scores = score_conversations(self.engine.model, self.processor, [conversation], labels,
                                                 batch_size=1, default_system=self.default_system, images=[images])[0]
                if mode == "score":
                    return max(scores, key=scores.get), scores
                text = generate_conversations(self.engine.model, self.processor, [conversation], batch_size=1,
                                              max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                              default_system=self.default_system, images=[images],
                                              should_stop=stop_now)[0]
                if stop_now is not None and stop_now():
                    raise Cancelled("the client disconnected during generation")
                return text, scores

        start = time.perf_counter()
        text, scores = self.worker.submit(run).result()
        seconds = time.perf_counter() - start
        # Re-tokenised from the text (the stable generation API returns text): exact for labels, an
        # estimate for generated text, capped at the limit; "length" when the limit was (about) reached.
        completion_tokens = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        if mode == "generate":
            completion_tokens = min(completion_tokens, max_new_tokens)
        finish = "length" if mode == "generate" and completion_tokens >= max_new_tokens else "stop"
        return Answer(text, mode, scores, prompt_tokens, completion_tokens, finish, seconds,
                      image_tokens(images, self.processor))


def model_label(engine: "Engine") -> str:
    """A short name for the loaded model: the adapter's directory name, else the model's."""
    path = engine.adapter_dir or engine.model_dir
    return Path(path).resolve().name or str(path)
