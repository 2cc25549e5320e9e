"""`vlmtune api` against hostile clients (issue 17): every costly request is refused before the work, within
a second, with the server's memory flat; a client that goes away abandons its work; everyone else is served.

One server (default limits and body size, as a user starts it) for the module; its memory is read from
/proc/<pid>/status (VmRSS now, VmHWM the peak so far), so the peak would show an image decoded at full size.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import shutil
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import (RULES_PROMPT, assert_one_line_error, checksums, png_data_url, run_inline, save_grey16_png,
                     truncate)
from serve.servers import free_port, memory_kb, running

for _package in ("fastapi", "uvicorn"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed (pip install 'vlmtune[api]')", allow_module_level=True)
httpx = pytest.importorskip("httpx")

LABELS = ["满足要求", "不满足要求"]
BIG_SIDE = 7900  # 62.4 M pixels: under the per-image cap, 187 MB once decoded to RGB


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("api-limits") / "api.log"
    args = ["api", "--model_name_or_path", str(tiny_model_dir), "--labels", ",".join(LABELS), "--port", str(port)]
    with running(args, f"http://127.0.0.1:{port}/health", log) as proc:
        yield {"url": f"http://127.0.0.1:{port}/v1/chat/completions", "proc": proc, "log": log}


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def small_url(tmp_path_factory) -> str:
    return png_data_url(tmp_path_factory.mktemp("img") / "scene.png", seed=3)


@pytest.fixture(scope="module")
def big_url() -> str:
    """A 7900 × 7900 PNG of 8 KB (1-bit, all black): tiny on the wire, 187 MB decoded."""
    return png_url(Image.new("1", (BIG_SIDE, BIG_SIDE)))


def ask(*image_urls: str, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    content.append({"type": "text", "text": RULES_PROMPT.replace("<image>", "")})
    return {"messages": [{"role": "user", "content": content}], **extra}


def post(server, body=None, content: bytes | None = None, timeout: float = 60):
    if content is not None:
        return httpx.post(server["url"], content=content, headers={"Content-Type": "application/json"},
                          timeout=timeout)
    return httpx.post(server["url"], json=body, timeout=timeout)


def test_normal_request_still_works(server, small_url):
    response = post(server, ask(small_url, vlmtune_mode="score"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] in LABELS


def amplification_requests(small_url: str, big_url: str) -> dict[str, dict]:
    """The issue's requests: each would cost gigabytes or minutes if it were served."""
    return {
        "40,000-character label": ask(small_url, vlmtune_mode="score", vlmtune_labels=["x" * 40_000, "y"]),
        "100 large images": ask(*[big_url] * 100, vlmtune_mode="score"),
        "max_tokens 32768": ask(small_url, max_tokens=32768),
        "3 large images (187 M pixels)": ask(big_url, big_url, big_url, vlmtune_mode="score"),
        "200,000-character label": ask(small_url, vlmtune_mode="score", vlmtune_labels=["x" * 200_000, "y"]),
        "17 labels": ask(small_url, vlmtune_mode="score", vlmtune_labels=[f"label {i}" for i in range(17)]),
        "huge seed": ask(small_url, seed=10**30),
        "max_completion_tokens 10**9": ask(small_url, max_completion_tokens=10**9),
        "9 images": ask(*[small_url] * 9, vlmtune_mode="score"),
        "a 900,000-character prompt": {"messages": [{"role": "user", "content": "要" * 900_000}]},
        "20,000 messages": {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
                            * 10_000 + [{"role": "user", "content": "x"}]},
        "5 stop strings": ask(small_url, stop=["a", "b", "c", "d", "e"]),
    }


def test_amplification_requests_are_refused_within_a_second_with_flat_memory(server, small_url, big_url):
    post(server, ask(small_url, max_tokens=2))  # warm: both passes have run once
    before = memory_kb(server["proc"].pid)
    for name, body in amplification_requests(small_url, big_url).items():
        start = time.monotonic()
        response = post(server, body)
        elapsed = time.monotonic() - start
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        error = response.json()["error"]
        assert error["message"] and "Traceback" not in response.text, name
        assert elapsed < 1.0, (name, elapsed)
    after = memory_kb(server["proc"].pid)
    # One of those images decoded would add 187 MB to the peak; the limits keep both flat.
    assert after["VmHWM"] - before["VmHWM"] < 64 * 1024, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 64 * 1024, (before, after)
    assert server["proc"].poll() is None


def test_each_refusal_names_the_limit(server, small_url, big_url):
    requests = amplification_requests(small_url, big_url)
    expected = {"40,000-character label": "--max_label_chars", "100 large images": "--max_images",
                "max_tokens 32768": "--max_tokens_limit", "3 large images (187 M pixels)": "--max_request_pixels",
                "17 labels": "--max_labels", "huge seed": "seed", "a 900,000-character prompt": "--max_prompt_tokens",
                "20,000 messages": "--max_prompt_tokens", "5 stop strings": "stop"}
    for name, fragment in expected.items():
        response = post(server, requests[name])
        assert response.status_code == 400 and fragment in response.json()["error"]["message"], (name, response.text)


def test_malformed_bodies_are_400_not_500(server, small_url):
    nested = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases = {
        "nested 100,000 deep": nested,
        "nested in a field": b'{"messages": [{"role": "user", "content": "x"}], "stop": ' + b"[" * 50_000
                             + b"]" * 50_000 + b"}",
        "temperature NaN": b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        "max_tokens Infinity": b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}',
        "not UTF-8": b'{"messages": [{"role": "user", "content": "\xff"}]}',
    }
    for name, content in cases.items():
        response = post(server, content=content)
        assert response.status_code == 400, (name, response.status_code, response.text[:300])
    # a truncated image (good header, data cut) and a PIL decompression bomb: 400s too
    raw = base64.b64decode(small_url.split(",", 1)[1])
    truncated = "data:image/png;base64," + base64.b64encode(raw[: len(raw) // 2]).decode()
    response = post(server, ask(truncated, vlmtune_mode="score"))
    assert response.status_code == 400 and "not a readable image" in response.json()["error"]["message"]
    bomb = png_url(Image.new("1", (20_000, 20_000)))  # 400 M pixels: over PIL's bomb limit and ours
    response = post(server, ask(bomb, vlmtune_mode="score"))
    assert response.status_code == 400, response.text
    log = Path(server["log"]).read_text()
    assert " 500 " not in log and "Traceback" not in log, log[-3000:]


def long_generation(server, small_url) -> tuple[dict, float]:
    """A generation that runs to max_tokens (512) on the random model: sampled at temperature 2, a seed whose
    answer never reaches <|im_end|> (most do not); the body and how long it takes alone."""
    for seed in range(20):
        body = ask(small_url, max_tokens=512, temperature=2.0, seed=seed, vlmtune_scores=False)
        start = time.monotonic()
        response = post(server, body)
        if response.json()["choices"][0]["finish_reason"] == "length":
            return body, time.monotonic() - start
    pytest.fail("no seed gave a 512-token generation")


def test_a_client_that_leaves_abandons_its_generation(server, small_url):
    """A long generation whose client times out is stopped: the next client is answered at once."""
    body, full = long_generation(server, small_url)
    with pytest.raises(httpx.ReadTimeout):
        post(server, body, timeout=full / 4)
    start = time.monotonic()
    response = post(server, ask(small_url, vlmtune_mode="score"))
    waited = time.monotonic() - start
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while "abandoned a request" not in Path(server["log"]).read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "abandoned a request: the client disconnected during generation" in Path(server["log"]).read_text()
    assert waited < full / 2, (waited, full)


def start_errors(tmp: Path, label_adapter: Path) -> dict:
    damaged = Path(shutil.copytree(label_adapter, tmp / "damaged-adapter"))
    truncate(damaged / "adapter_model.safetensors")
    return {
        "--max_labels 0": (["--max_labels", "0"], ["--max_labels", "≥ 1"]),
        "--max_new_tokens above --max_tokens_limit": (["--max_new_tokens", "1000"], ["--max_new_tokens 1000",
                                                                                     "--max_tokens_limit 512"]),
        "--max_image_pixels above --max_request_pixels": (["--max_image_pixels", "200000000"],
                                                          ["--max_image_pixels", "--max_request_pixels"]),
        "one label": (["--labels", "满足要求"], ["--labels", "at least two"]),
        "truncated adapter": (["--adapter_name_or_path", str(damaged)],
                              ["adapter_model.safetensors", "not a readable safetensors"]),
    }


def test_bad_server_settings_are_one_line(tmp_path, capsys, tiny_model_dir, label_adapter):
    for name, (args, fragments) in start_errors(tmp_path, label_adapter).items():
        before = checksums(tmp_path, tiny_model_dir)
        result = run_inline(capsys, "api", "--model_name_or_path", tiny_model_dir, "--port", free_port(), *args)
        try:
            assert_one_line_error(result, *fragments)
        except AssertionError as exc:
            raise AssertionError(name) from exc
        assert checksums(tmp_path, tiny_model_dir) == before, name


# ---------------------------------------------------------------------------------------------
# Issue 25: fields read wrongly or silently ignored, and images whose decode costs more than their pixels say


@pytest.fixture(scope="module")
def wide_urls(tmp_path_factory) -> dict[str, str]:
    """8000 × 8000 black greyscale images, exactly the per-image pixel limit: 16-bit (a 124 KB PNG, 448 MB held while
    decoding) and 32-bit float (a TIFF, 576 MB)."""
    tmp = tmp_path_factory.mktemp("wide")
    grey16 = save_grey16_png(tmp / "grey16.png", 8000, 8000)
    grey32 = tmp / "grey32.tiff"
    Image.new("F", (8000, 8000)).save(grey32, format="TIFF", compression="tiff_deflate")
    return {"grey16": "data:image/png;base64," + base64.b64encode(grey16.read_bytes()).decode(),
            "grey32": "data:image/tiff;base64," + base64.b64encode(grey32.read_bytes()).decode()}


def issue_25_requests(wide_urls: dict[str, str]) -> dict[str, tuple[object, str]]:
    """name: (body — a dict, or the raw bytes a hostile client sends —, what the 400's message must name)."""
    text = {"messages": [{"role": "user", "content": "x"}]}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    return {
        "max_tokens of 5,000 digits": (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": '
                                       + b"9" * 5000 + b"}", "max_tokens"),
        "seed of 5,000 digits": (b'{"messages": [{"role": "user", "content": "x"}], "seed": -' + b"9" * 5000 + b"}",
                                 "seed"),
        "a lone surrogate": (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\ud800b"}]}]}',
                             "messages[0].content[0].text"),
        "a lone surrogate in a label": (b'{"messages": [{"role": "user", "content": "x"}], "vlmtune_mode": "score", '
                                        b'"vlmtune_labels": ["\\udfff", "b"]}', "vlmtune_labels[0]"),
        "16-bit 8000x8000 greyscale": (ask(wide_urls["grey16"], vlmtune_mode="score"), "--max_image_bytes"),
        "32-bit 8000x8000 greyscale": (ask(wide_urls["grey32"], vlmtune_mode="score"), "--max_image_bytes"),
        "tools": ({**text, "tools": [tool]}, "tools"),
        "functions": ({**text, "functions": [tool["function"]]}, "functions"),
        "tool_choice": ({**text, "tool_choice": "required"}, "tool_choice"),
        "function_call": ({**text, "function_call": {"name": "f"}}, "function_call"),
        "response_format json_object": ({**text, "response_format": {"type": "json_object"}}, "response_format"),
        "response_format json_schema": ({**text, "response_format": {"type": "json_schema", "json_schema": {
            "name": "verdict", "schema": {"type": "object"}}}}, "response_format"),
        "top_p": ({**text, "temperature": 1.0, "top_p": 0.5}, "top_p"),
        "presence_penalty": ({**text, "presence_penalty": 0.5}, "presence_penalty"),
        "frequency_penalty": ({**text, "frequency_penalty": -1}, "frequency_penalty"),
        "logit_bias": ({**text, "logit_bias": {"1234": 5}}, "logit_bias"),
        "logprobs in generate mode": ({**text, "vlmtune_mode": "generate", "logprobs": True}, "logprobs"),
        "top_logprobs without logprobs": ({**text, "vlmtune_mode": "score", "top_logprobs": 2}, "top_logprobs"),
    }


def test_issue_25_requests_are_400s_naming_the_field_within_a_second_with_flat_memory(server, small_url, wide_urls):
    post(server, ask(small_url, max_tokens=2))  # warm: both passes have run once
    before = memory_kb(server["proc"].pid)
    for name, (body, field) in issue_25_requests(wide_urls).items():
        start = time.monotonic()
        response = post(server, content=body) if isinstance(body, bytes) else post(server, body)
        elapsed = time.monotonic() - start
        assert response.status_code == 400, (name, response.status_code, response.text[:300])
        assert field in response.json()["error"]["message"], (name, response.text[:300])
        assert elapsed < 1.0, (name, elapsed)
    after = memory_kb(server["proc"].pid)
    # Either wide image decoded would add 448-576 MB to the peak (1.3-1.5 GB before decoding was made lean).
    assert after["VmHWM"] - before["VmHWM"] < 64 * 1024, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 64 * 1024, (before, after)
    assert httpx.get(server["url"].replace("/v1/chat/completions", "/health"), timeout=5).status_code == 200
    response = post(server, ask(small_url, vlmtune_mode="score"))
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] in LABELS
    log = Path(server["log"]).read_text()
    assert " 500 " not in log and "Traceback" not in log, log[-3000:]


def test_an_api_key_set_but_empty_is_refused_at_start(capsys, monkeypatch, tiny_model_dir):
    """Not a server open to anyone while its operator believes it guarded. (The port is taken, so a start that
    got past the key would stop there, naming the port instead.)"""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for blank in ("", "  "):
            monkeypatch.setenv("VLMTUNE_API_KEY", blank)
            result = run_inline(capsys, "api", "--model_name_or_path", tiny_model_dir, "--port",
                                taken.getsockname()[1])
            assert_one_line_error(result, "VLMTUNE_API_KEY", "empty")
