"""What the web UI and the API share: the model loaded once behind a lock, what a request may cost, images, answers.

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
import contextlib
import dataclasses
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

# Decoding a huge image costs memory before any resize: refuse above this many pixels (≈ 8k × 8k) and above this
# many bytes held while decoding (`data.images.decoded_bytes`: an 8-bit greyscale or palette image at the pixel
# limit, 5 bytes a pixel; RGB takes 4).
MAX_IMAGE_PIXELS = 64_000_000
MAX_IMAGE_BYTES = 5 * MAX_IMAGE_PIXELS
DEFAULT_MAX_REQUEST_BYTES = 20 * 1024 * 1024
TOKENS_PER_MESSAGE = 4  # <|im_start|>, the role, a newline, <|im_end|>: the least a message costs in a prompt
MODES = ("score", "generate")


class RequestError(ValueError):
    """A problem with one request (bad image, placeholder count, unknown label): the client's fault."""


class Cancelled(RequestError):
    """The client went away before its answer was ready: the work was abandoned."""


class OutOfMemory(RequestError):
    """The device ran out of memory on this request; its cache was emptied and the server goes on (the API answers
    503, the page shows the message)."""


@contextlib.contextmanager
def out_of_memory_as_error():
    """Model work whose device out-of-memory error becomes OutOfMemory, after the allocator's cache is emptied —
    outside the except block, once the failed call's tensors are released — so the next request starts clean."""
    import torch

    try:
        yield
        return
    except torch.OutOfMemoryError:
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise OutOfMemory("the model ran out of GPU memory on this request; send fewer or smaller images or ask for "
                      "fewer tokens, or retry when the server is less busy")


# ---------------------------------------------------------------------------------------------
# What one request may cost: the API's and the web page's bounds, defined once


def _limit(default: int, text: str):
    return dataclasses.field(default=default, metadata={"help": text})


# Limits fields whose flag has another name (`--max_tokens_limit`: `--max_new_tokens` is a request's default).
LIMIT_FLAGS = {"max_tokens": "max_tokens_limit"}


@dataclasses.dataclass
class Limits:
    """What one request may cost, each bound checked before the work it bounds (a 400 above it; on the web page, an
    error in the page). `vlmtune api` takes every field as a flag but chars_per_token, `vlmtune webui` those that
    apply to one uploaded image and a prompt (`serve/webui.py`).

    The defaults suit a 7B model on one GPU, answering short label-like answers: 16 labels of at most
    128 characters (label scoring runs every label's tokens through the model, and its attention mask is
    label length squared), 8 images and 128 M decoded pixels per request (each image is decoded on the CPU
    at full size, then resized to image_max_pixels), 64 M pixels and 320 MB held while decoding per image,
    16,384 prompt tokens (text + image tokens; ≈1 GB of KV cache on a 7B model in bf16) and max_tokens
    up to 512 (one request holds the model while it generates; answers here are a few tokens).
    """

    max_request_bytes: int = _limit(DEFAULT_MAX_REQUEST_BYTES, "Largest request body accepted (413 above); on the "
                                                               "web page, the largest uploaded file.")
    max_labels: int = _limit(16, "Most candidate labels in vlmtune_labels.")
    max_label_chars: int = _limit(128, "Longest candidate label, in characters.")
    max_images: int = _limit(8, "Most images per request.")
    max_image_pixels: int = _limit(MAX_IMAGE_PIXELS, "Most pixels of one image (read from its header before "
                                                     "decoding).")
    max_image_bytes: int = _limit(MAX_IMAGE_BYTES, "Most memory one image may take while it is decoded, in bytes, "
                                                   "read from its header before decoding: pixels × 4 for RGB, 5 for "
                                                   "8-bit greyscale, 7 for 16-bit, 9 for 32-bit, 12-16 with "
                                                   "transparency.")
    max_request_pixels: int = _limit(128_000_000, "Most pixels of all images of a request together.")
    max_prompt_tokens: int = _limit(16384, "Longest prompt in tokens, image tokens included.")
    # `--max_tokens_limit` on the command line: `--max_new_tokens` is the default a request gets.
    max_tokens: int = _limit(512, "Largest max_tokens / max_completion_tokens a request may ask for.")
    # Text longer than this many characters per allowed prompt token is refused without tokenising it (tokenising
    # 200,000 characters takes 100 MB): no real prompt averages 8 characters per token (English ≈ 4, Chinese ≈ 1.5).
    chars_per_token: int = _limit(8, "Characters of text per allowed prompt token above which a prompt is refused "
                                      "without tokenising it.")

    def check(self, max_new_tokens: int) -> None:
        """Each limit must be ≥ 1 (the body at least 1024 bytes), the per-image pixels within the per-request ones,
        and the default max_new_tokens within max_tokens (one-line errors naming the flags)."""
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise VlmtuneError(f"--{LIMIT_FLAGS.get(f.name, f.name)} must be ≥ 1, got {getattr(self, f.name)}")
        if self.max_request_bytes < 1024:
            raise VlmtuneError(f"--max_request_bytes {self.max_request_bytes} is too small (at least 1024)")
        if max_new_tokens < 1 or max_new_tokens > self.max_tokens:
            raise VlmtuneError(f"--max_new_tokens {max_new_tokens} must be between 1 and --max_tokens_limit "
                               f"{self.max_tokens}")
        if self.max_image_pixels > self.max_request_pixels:
            raise VlmtuneError(f"--max_image_pixels {self.max_image_pixels:,} is larger than --max_request_pixels "
                               f"{self.max_request_pixels:,}")

    def check_labels(self, labels: list[str] | None) -> None:
        if labels is None:
            return
        if len(labels) > self.max_labels:
            raise RequestError(f"vlmtune_labels: {len(labels)} labels, more than this server scores ({self.max_labels}; "
                               f"--max_labels)")
        for i, label in enumerate(labels):
            if len(label) > self.max_label_chars:
                raise RequestError(f"vlmtune_labels[{i}]: {len(label)} characters, more than this server scores "
                                   f"({self.max_label_chars}; --max_label_chars)")

    def check_max_tokens(self, value: int | None, name: str) -> None:
        if value is not None and value > self.max_tokens:
            raise RequestError(f"{name}: {value} is more than this server generates ({self.max_tokens}; "
                               f"--max_tokens_limit)")

    def check_text(self, messages) -> None:
        """The messages' count and characters against max_prompt_tokens, before anything is tokenised (OpenAI
        messages, whose content may be a list of parts, or vlmtune Messages)."""
        if len(messages) * TOKENS_PER_MESSAGE > self.max_prompt_tokens:
            raise RequestError(f"messages: {len(messages):,} messages, more than a prompt of {self.max_prompt_tokens} "
                               f"tokens can hold (--max_prompt_tokens)")
        chars = 0
        for message in messages:
            content = message.content or ""
            chars += len(content) if isinstance(content, str) else sum(len(p.text) for p in content if p.type == "text")
        if chars > self.max_prompt_tokens * self.chars_per_token:
            raise RequestError(f"messages: {chars:,} characters of text, more than a prompt of "
                               f"{self.max_prompt_tokens} tokens can hold (--max_prompt_tokens)")

    def check_image(self, image: Image.Image, what: str) -> None:
        """The pixel rule, for every server and every image source: a lazily opened image's pixels and the bytes its
        decode holds (`data.images.decoded_bytes`), both from its header, within the limits — else it is closed and
        refused."""
        from vlmtune.data.images import decoded_bytes

        pixels, held = image.width * image.height, decoded_bytes(image)
        problem = None
        if pixels > self.max_image_pixels:
            problem = (f"{image.width}×{image.height} pixels is more than this server decodes per image "
                       f"({self.max_image_pixels:,}; --max_image_pixels)")
        elif held > self.max_image_bytes:
            problem = (f"{image.width}×{image.height} pixels of mode {image.mode} take {held:,} bytes to decode, more "
                       f"than this server decodes per image ({self.max_image_bytes:,}; --max_image_bytes)")
        if problem:
            image.close()
            raise RequestError(f"{what}: {problem}")


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


def open_image(source, what: str = "image", limits: Limits | None = None) -> Image.Image:
    """Image bytes (any format Pillow reads) or an image file → a PIL image opened lazily: its header read and
    checked by `Limits.check_image`, its pixels not decoded yet (`resize_image` does, one image at a time, so
    a request's images are never all decoded at once). RequestError if it is not an image or too large."""
    from vlmtune.data.images import ImageError, open_header

    if isinstance(source, bytes) and not source:
        raise RequestError(f"{what}: empty image data")
    try:
        image = open_header(io.BytesIO(source) if isinstance(source, bytes) else source)
    except ImageError as exc:
        raise RequestError(f"{what}: {str(exc).replace('unreadable image', 'not a readable image')}") from None
    (limits or Limits()).check_image(image, what)
    return image


def decode_data_url(url: str, what: str = "image", limits: Limits | None = None) -> Image.Image:
    """`data:image/png;base64,....` → PIL image, opened lazily (`open_image`). Only base64 data URLs
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
    return open_image(raw, what, limits)


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
                             attn_implementation=args.attn_implementation, device=args.device,
                             template=getattr(args, "template", None),
                             enable_thinking=getattr(args, "enable_thinking", None), log=log)
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
        from vlmtune.data.encode import context_length

        return context_length(getattr(self.engine.model, "config", None))

    def prepare_file(self, path: str | Path, limits: Limits | None = None) -> "torch.Tensor":
        """An image file, checked by `Limits.check_image` from its header, then read exactly as training reads dataset
        images (`data.images.load_resized`'s decode and resize)."""
        what = Path(path).name
        return self.prepare_image(open_image(str(path), what, limits), what)

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
        if context is not None and prompt_tokens > context:  # score mode (with --max_prompt_tokens above it)
            raise RequestError(f"the prompt's {prompt_tokens} tokens exceed the model's context of {context} tokens")
        stop_now = cancelled.is_set if cancelled is not None else None

        def run() -> tuple[str, dict[str, float] | None]:
            with self.lock, out_of_memory_as_error():
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
