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
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import RULES_PROMPT, assert_one_line_error, checksums, png_data_url, run_inline, truncate
from serve.servers import free_port, running

for _package in ("fastapi", "uvicorn"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed (pip install 'vlmtune[api]')", allow_module_level=True)
httpx = pytest.importorskip("httpx")

LABELS = ["满足要求", "不满足要求"]
BIG_SIDE = 7900  # 62.4 M pixels: under the per-image cap, 187 MB once decoded to RGB


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


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
