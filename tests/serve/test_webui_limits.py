"""`vlmtune webui`'s bounds (issue 25) in-process: the page's handler refuses what the API refuses — an image's
pixels and decoded bytes, the prompt's tokens, max new tokens — within a second, with memory flat, and answers again
afterwards; Gradio's upload route refuses a file over the limit and the uploads are deleted at shutdown."""

from __future__ import annotations

import importlib.util
import io
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from helpers import RULES_PROMPT, SYSTEM, save_grey16_png, save_image
from serve.servers import free_port, memory_kb
from vlmtune.serve.common import Limits, ModelService, RequestError
from vlmtune.serve.webui import UPLOAD_CLEANUP, PageDefaults, answer_page

LABELS = ["满足要求", "不满足要求"]


@pytest.fixture(scope="module")
def service(tiny_model_dir) -> ModelService:
    from vlmtune.infer.engine import load_engine

    return ModelService(load_engine(str(tiny_model_dir), log=lambda *_: None), LABELS, max_new_tokens=8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A scene, and black 16-bit greyscale PNGs: 12000 × 12000 (280 KB; 144 M pixels, over the per-image limit) and
    8000 × 8000 (124 KB; exactly the pixel limit, 448 MB held while decoding)."""
    tmp = tmp_path_factory.mktemp("page-images")
    save_image(tmp / "scene.png", (200, 150), seed=3)
    return {"scene": tmp / "scene.png", "12000": save_grey16_png(tmp / "grey16-12000.png", 12000, 12000),
            "8000": save_grey16_png(tmp / "grey16-8000.png", 8000, 8000)}


def judge(service: ModelService, image: Path | None, prompt: str = RULES_PROMPT, mode: str = "score",
          max_new_tokens: int = 8):
    """The page's button: image path, prompt, system prompt, mode, max new tokens, temperature."""
    return answer_page(service, Limits(), str(image) if image else None, prompt, SYSTEM, mode, max_new_tokens, 0.0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # 144 M pixels: Pillow warns, we refuse
def test_page_requests_over_a_bound_are_refused_within_a_second_with_flat_memory(service, images):
    assert judge(service, images["scene"]).text in LABELS  # warm
    before = memory_kb(os.getpid())
    cases = {
        "12000x12000 16-bit PNG": (dict(image=images["12000"]), "--max_image_pixels"),
        "8000x8000 16-bit PNG": (dict(image=images["8000"]), "--max_image_bytes"),
        "200,000-character prompt": (dict(image=images["scene"], prompt=(RULES_PROMPT + RULES_PROMPT.replace(
            "<image>", "") * 2000)[:200_000]), "--max_prompt_tokens"),
        "200,000 characters without spaces": (dict(image=None, prompt="要" * 200_000), "--max_prompt_tokens"),
        "1024 new tokens": (dict(image=images["scene"], mode="generate", max_new_tokens=1024), "--max_tokens_limit"),
    }
    for name, (kwargs, flag) in cases.items():
        start = time.monotonic()
        with pytest.raises(RequestError, match=flag):
            judge(service, **kwargs)
        assert time.monotonic() - start < 1.0, name
    after = memory_kb(os.getpid())
    assert after["VmHWM"] - before["VmHWM"] < 64 * 1024, (before, after)  # the 8000² image alone is 448 MB decoded
    assert judge(service, images["scene"]).text in LABELS  # and the page still answers


needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                  reason="Gradio is not installed (pip install 'vlmtune[webui]')")


@needs_gradio
def test_gradio_refuses_large_uploads_and_deletes_uploads_at_shutdown(monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    httpx = pytest.importorskip("httpx")
    from vlmtune.serve.webui import build_app, launch_options

    limits = Limits()
    page = build_app(SimpleNamespace(labels=LABELS, max_new_tokens=8), PageDefaults(), "test", limits)  # never asked
    assert page.delete_cache == UPLOAD_CLEANUP
    port = free_port()
    page.queue(default_concurrency_limit=1).launch(**launch_options(PageDefaults(), limits, "127.0.0.1", port),
                                                   prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        start = time.monotonic()
        big = httpx.post(url, files={"files": ("big.png", bytes(limits.max_request_bytes + 1), "image/png")},
                         timeout=30)
        assert big.status_code == 413 and time.monotonic() - start < 1.0, (big.status_code, big.text[:200])
        buffer = io.BytesIO()
        Image.new("RGB", (32, 24), "red").save(buffer, format="PNG")
        small = httpx.post(url, files={"files": ("small.png", buffer.getvalue(), "image/png")}, timeout=30)
        assert small.status_code == 200, small.text[:200]
        (uploaded,) = small.json()
        assert Path(uploaded).is_file()
    finally:
        page.close()
    assert not Path(uploaded).exists()


def test_bad_page_limits_are_one_line_at_start(capsys, tiny_model_dir):
    from helpers import assert_one_line_error, run_inline

    for args, fragments in [(["--max_image_bytes", "0"], ["--max_image_bytes", "≥ 1"]),
                            (["--max_new_tokens", "1000"], ["--max_new_tokens 1000", "--max_tokens_limit 512"])]:
        result = run_inline(capsys, "webui", "--model_name_or_path", tiny_model_dir, "--port", free_port(), *args)
        assert_one_line_error(result, *fragments)


@needs_gradio
def test_with_a_login_every_route_uploads_included_is_closed_until_logged_in(monkeypatch):
    """VLMTUNE_WEBUI_AUTH: Gradio's login on the page, its upload route and its API (the upload route was open to
    anyone who could reach the port)."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    httpx = pytest.importorskip("httpx")
    from vlmtune.serve.webui import build_app, launch_options

    page = build_app(SimpleNamespace(labels=LABELS, max_new_tokens=8), PageDefaults(), "test", Limits())
    port = free_port()
    page.queue(default_concurrency_limit=1).launch(
        **launch_options(PageDefaults(), Limits(), "127.0.0.1", port, auth=("judge", "s3cret:pass")),
        prevent_thread_lock=True, quiet=True)
    try:
        base = f"http://127.0.0.1:{port}"
        buffer = io.BytesIO()
        Image.new("RGB", (32, 24), "red").save(buffer, format="PNG")
        upload = {"files": ("small.png", buffer.getvalue(), "image/png")}
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/config").status_code == 401
            assert client.post("/gradio_api/upload", files=upload).status_code == 401
            assert client.post("/login", data={"username": "judge", "password": "wrong"}).status_code == 400
            assert client.post("/login", data={"username": "judge", "password": "s3cret:pass"}).status_code == 200
            assert client.get("/config").status_code == 200
            assert client.post("/gradio_api/upload", files=upload).status_code == 200
    finally:
        page.close()


@pytest.mark.parametrize("value", ["", "judge", "judge:", ":hunter2"])
def test_a_login_that_is_not_user_and_password_is_one_line_at_start(capsys, monkeypatch, tiny_model_dir, value):
    from helpers import assert_one_line_error, run_inline

    monkeypatch.setenv("VLMTUNE_WEBUI_AUTH", value)
    result = run_inline(capsys, "webui", "--model_name_or_path", tiny_model_dir, "--port", free_port())
    line = assert_one_line_error(result, "VLMTUNE_WEBUI_AUTH", "user:password")
    assert "hunter2" not in line  # a password is never echoed
