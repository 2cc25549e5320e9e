"""The page of `vlmtune webui`: try the model by hand — drop an image, read the answer and the label probabilities.

    vlmtune webui --model_name_or_path /data/Qwen2.5-VL-7B-Instruct --adapter_name_or_path /output/my_task \\
        --dataset my_dataset --dataset_dir data           # prompt box pre-filled with the dataset's rules
    vlmtune webui ... --labels 满足要求,不满足要求 --host 0.0.0.0 --port 7860

The page (Gradio) has an image upload, the prompt (the user prompt of the dataset's first record, with
its `<image>` placeholder; edit it or type your own), the system prompt, and a button. With a closed
label set — `--labels`, or the answers of `--dataset` when they form one — the answer is the most
probable label by label scoring and a bar shows P(label) for every label; "generate" mode decodes
text instead (greedy unless a temperature is set), still showing the probabilities.

The model is loaded once at start-up; requests queue on one lock. The page binds 127.0.0.1 unless
`--host` says otherwise, never opens a public share link, and sends no analytics. It has the API's bounds
(`serve.common.Limits`, the fields in PAGE_LIMITS): an uploaded file's size (Gradio's upload route refuses a larger
one), an image's pixels and the bytes its decode holds (from its header, before decoding), the prompt's tokens
(its characters first, untokenised) and max new tokens; uploads are deleted an hour after they arrive and all at
shutdown (UPLOAD_CLEANUP).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.data.conversation import IMAGE_PLACEHOLDER, Message
from vlmtune.errors import VlmtuneError
from vlmtune.serve.common import MODES, Answer, Limits, ModelService, RequestError, is_loopback, model_label

# Fonts the browser has; the default theme would ask Google Fonts, which offline machines cannot reach.
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Noto Sans CJK SC",
                "WenQuanYi Micro Hei", "PingFang SC", "Microsoft YaHei", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
MAX_EXAMPLES = 4
# The Limits fields that bound the page's requests (one image, one prompt): `vlmtune webui` takes them as flags.
PAGE_LIMITS = ("max_request_bytes", "max_image_pixels", "max_image_bytes", "max_prompt_tokens", "max_tokens")
# The page's login, as `user:password` (an environment variable, not a flag: flags show in `ps`).
AUTH_ENV = "VLMTUNE_WEBUI_AUTH"


# Gradio's delete_cache: every 5 minutes, uploaded files older than an hour are deleted (and all at shutdown).
UPLOAD_CLEANUP = (300, 3600)


@dataclass
class PageDefaults:
    """What the page starts with: the rules prompt, system prompt, label set and example images."""

    prompt: str = f"{IMAGE_PLACEHOLDER}判断以上图片是否满足要求:\n1. ...\n请只输出如下格式:\"满足要求\", 或 \"不满足要求\"。"
    system: str = ""
    labels: list[str] | None = None
    examples: list[list[str]] = field(default_factory=list)  # [[image path, prompt, answer]]
    source: str = ""


def dataset_defaults(dataset: str, dataset_dir: str, log=print) -> PageDefaults:
    """Prompt and system of the dataset's first record, its label set, and a few of its images."""
    from vlmtune.data.loader import load_datasets
    from vlmtune.labels import infer_label_set

    loaded = load_datasets(dataset, dataset_dir, None)
    conversations = loaded.conversations
    if not conversations:
        raise VlmtuneError(f"dataset '{dataset}' has no usable record" +
                           (f" ({loaded.problems[0]})" if loaded.problems else ""))
    first = conversations[0]
    examples = [[c.images[0], c.prompt, c.answer or ""] for c in conversations
                if len(c.images) == 1 and c.prompt.count(IMAGE_PLACEHOLDER) == 1 and Path(c.images[0]).is_file()]
    defaults = PageDefaults(prompt=first.prompt, system=first.system or "",
                            labels=infer_label_set([c.answer for c in conversations]),
                            examples=examples[:MAX_EXAMPLES], source=f"{dataset} ({first.source}, record {first.index})")
    log(f"prompt from {defaults.source}; {len(conversations)} records; label set: "
        f"{', '.join(defaults.labels) if defaults.labels else 'none (answers are not a closed set)'}")
    return defaults


def build_messages(prompt: str, system: str, has_image: bool) -> list[Message]:
    """System (optional) + one user turn; an image without a placeholder goes before the text."""
    prompt = prompt or ""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if has_image and count == 0:
        prompt = IMAGE_PLACEHOLDER + prompt
    elif has_image and count > 1:
        raise RequestError(f"the prompt has {count} {IMAGE_PLACEHOLDER} placeholders but the page sends one image")
    elif not has_image and count:
        raise RequestError("upload an image first (the prompt has an <image> placeholder)")
    if not prompt.replace(IMAGE_PLACEHOLDER, "").strip() and not has_image:
        raise RequestError("type a prompt or upload an image")
    messages = [Message("system", system)] if system and system.strip() else []
    return messages + [Message("user", prompt)]


def answer_page(service: ModelService, limits: Limits, image: str | None, prompt: str, system: str, mode: str,
                max_new_tokens: float, temperature: float) -> Answer:
    """What the page's button does, each bound checked before the work it bounds (RequestError above one): max new
    tokens, the prompt's characters, the image's pixels and decoded bytes from its header, the prompt's tokens."""
    limits.check_max_tokens(int(max_new_tokens), "max new tokens")
    messages = build_messages(prompt, system, image is not None)
    limits.check_text(messages)
    images = [service.prepare_file(image, limits)] if image is not None else []
    return service.answer(messages, images, mode=mode, max_new_tokens=int(max_new_tokens),
                          temperature=float(temperature), seed=0 if temperature else None,
                          max_prompt_tokens=limits.max_prompt_tokens)


def build_app(service: ModelService, defaults: PageDefaults, title: str, limits: Limits | None = None):
    """The Gradio Blocks page (not launched)."""
    import gradio as gr

    labels = service.labels
    limits = limits or Limits()

    def judge(image, prompt, system, mode, max_new_tokens, temperature):
        try:
            answer = answer_page(service, limits, image, prompt, system, mode, max_new_tokens, temperature)
        except RequestError as exc:
            raise gr.Error(str(exc)) from None
        info = (f"{answer.mode} mode · {answer.seconds:.2f} s · {answer.prompt_tokens} prompt tokens"
                + (f" ({sum(answer.image_tokens)} image tokens)" if answer.image_tokens else ""))
        return answer.text, answer.scores, info

    with gr.Blocks(title="vlmtune", analytics_enabled=False, delete_cache=UPLOAD_CLEANUP) as app:
        gr.Markdown(f"## vlmtune · {title}")
        with gr.Row():
            with gr.Column(scale=3):
                # type="filepath" + image_mode=None: the uploaded file itself, read exactly as training
                # reads dataset files (no EXIF rotation, no re-encoding by Gradio).
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                 height=320, elem_id="vlmtune-image")
                prompt = gr.Textbox(value=defaults.prompt, label="Prompt (rules)", lines=8, max_lines=30,
                                    elem_id="vlmtune-prompt",
                                    info=f"from {defaults.source}" if defaults.source else None)
                with gr.Accordion("Options", open=False):
                    system = gr.Textbox(value=defaults.system, label="System prompt", lines=2,
                                        elem_id="vlmtune-system")
                    mode = gr.Radio(choices=list(MODES) if labels else ["generate"],
                                    value="score" if labels else "generate", label="Answer by",
                                    info="score: the most probable label (label scoring); generate: decoded text",
                                    elem_id="vlmtune-mode")
                    max_new_tokens = gr.Slider(1, limits.max_tokens, value=service.max_new_tokens, step=1,
                                               label="Max new tokens (generate)")
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05,
                                            label="Temperature (generate; 0 = greedy)")
                run = gr.Button("Judge", variant="primary", elem_id="vlmtune-run")
            with gr.Column(scale=2):
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="vlmtune-answer")
                scores = gr.Label(label="Label probabilities", num_top_classes=len(labels) if labels else None,
                                  visible=bool(labels), elem_id="vlmtune-scores")
                info = gr.Markdown(elem_id="vlmtune-info")
                if defaults.examples:
                    gr.Examples(examples=[[path, text] for path, text, _ in defaults.examples],
                                inputs=[image, prompt], label="Dataset images",
                                example_labels=[f"{Path(path).name}: {truth}" if truth else Path(path).name
                                                for path, _, truth in defaults.examples])
        run.click(judge, inputs=[image, prompt, system, mode, max_new_tokens, temperature],
                  outputs=[answer, scores, info], concurrency_limit=1, api_name="judge")
    return app


def launch_options(defaults: PageDefaults, limits: Limits, host: str, port: int,
                   auth: tuple[str, str] | None = None) -> dict:
    """Gradio's launch() settings: no share link, no browser, the dataset's example folders readable, uploads
    refused above max_request_bytes; with `auth` (user, password) a login page, and every route — the upload
    route and the page's API included — answers 401 until logged in."""
    import gradio as gr

    allowed = sorted({str(Path(path).resolve().parent) for path, _, _ in defaults.examples})
    return dict(server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=False,
                theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS), allowed_paths=allowed or None,
                footer_links=[], show_error=True, max_file_size=limits.max_request_bytes, auth=auth)


def launch_page(service: ModelService, defaults: PageDefaults, host: str, port: int, limits: Limits,
                auth: tuple[str, str] | None = None) -> None:
    """Build the page for the loaded model and serve it until interrupted (no share link, no analytics)."""
    app = build_app(service, defaults, model_label(service.engine), limits)
    if not is_loopback(host) and auth is None:
        print(f"warning: binding {host} without {AUTH_ENV}: anyone who can reach this address can use the model "
              f"and upload files", file=sys.stderr)
    labels = service.labels
    print(f"vlmtune webui: http://{host}:{port}  (labels: {', '.join(labels) if labels else 'none'}; per request at "
          f"most a {limits.max_request_bytes:,}-byte upload of {limits.max_image_pixels:,} pixels, "
          f"{limits.max_prompt_tokens:,} prompt tokens)", flush=True)
    app.queue(default_concurrency_limit=1).launch(**launch_options(defaults, limits, host, port, auth))
