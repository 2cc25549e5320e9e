"""`vlmtune api` driven by the official `openai` client, against a server this test starts.

The client does not validate responses, so every ChatCompletion field is asserted here. The tiny
model is random; answers are made labels by label scoring (`vlmtune_mode: score`).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import time
from pathlib import Path

import pytest

from serve.servers import free_port, running
from helpers import ALL_ARCHS, RULES_PROMPT, SYSTEM, png_data_url

for _package in ("fastapi", "uvicorn"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed (pip install 'vlmtune[api]')", allow_module_level=True)
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
httpx = pytest.importorskip("httpx")

POS, NEG = "满足要求", "不满足要求"
LABELS = [POS, NEG]
KEY = "test-key-123"
MAX_BYTES = 400_000


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    args = ["api", "--model_name_or_path", str(tiny_model_dir), "--labels", ",".join(LABELS), "--port", str(port),
            "--max_request_bytes", str(MAX_BYTES), "--served_model_name", "tiny-judge"]
    with running(args, f"http://127.0.0.1:{port}/health", log, env={"VLMTUNE_API_KEY": KEY}) as proc:
        yield {"base": f"http://127.0.0.1:{port}/v1", "proc": proc, "log": log}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"], api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def image_url(tmp_path_factory) -> str:
    return png_data_url(tmp_path_factory.mktemp("img") / "scene.png", seed=7)


def messages(image_url: str, prompt: str = RULES_PROMPT) -> list[dict]:
    """The dataset's own prompt (with its `<image>` placeholder) + the image as a data: URL part."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": prompt}]}]


def assert_completion(completion, model: str = "tiny-judge") -> None:
    assert completion.id.startswith("chatcmpl-") and len(completion.id) > 12
    assert completion.object == "chat.completion"
    assert isinstance(completion.created, int) and abs(completion.created - time.time()) < 600
    assert completion.model == model
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 64 and usage.completion_tokens >= 1  # the image alone is 64+ tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_image_request_scored_returns_a_label(client, image_url):
    completion = client.chat.completions.create(model="tiny-judge", messages=messages(image_url),
                                                extra_body={"vlmtune_mode": "score"})
    assert_completion(completion)
    answer = completion.choices[0].message.content
    assert answer in LABELS  # exact match: 满足要求 is a substring of 不满足要求
    assert completion.choices[0].finish_reason == "stop"
    extra = completion.model_extra["vlmtune"]
    assert extra["mode"] == "score"
    scores = extra["scores"]
    assert list(scores) == LABELS
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert max(scores, key=scores.get) == answer


def test_image_placement_by_part_or_placeholder_is_the_same(client, image_url):
    """Image part before the text == the dataset's `<image>` placeholder in the text."""
    by_part = client.chat.completions.create(model="m", messages=messages(image_url, RULES_PROMPT.replace("<image>", "")),
                                             extra_body={"vlmtune_mode": "score"})
    by_placeholder = client.chat.completions.create(model="m", messages=messages(image_url),
                                                    extra_body={"vlmtune_mode": "score"})
    a, b = by_part.model_extra["vlmtune"]["scores"], by_placeholder.model_extra["vlmtune"]["scores"]
    assert a == pytest.approx(b, abs=1e-6)
    assert by_part.usage.prompt_tokens == by_placeholder.usage.prompt_tokens


def test_generation_is_greedy_by_default_and_carries_scores(client, image_url):
    first = client.chat.completions.create(model="m", messages=messages(image_url), max_tokens=4)
    second = client.chat.completions.create(model="m", messages=messages(image_url), max_tokens=4)
    assert_completion(first)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.completion_tokens <= 4 + 1
    assert first.model_extra["vlmtune"]["mode"] == "generate"
    assert set(first.model_extra["vlmtune"]["scores"]) == set(LABELS)


def test_stream_yields_chunks_ending_with_done(client, server, image_url):
    chunks = list(client.chat.completions.create(model="m", messages=messages(image_url), stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"vlmtune_mode": "score"}))
    assert len(chunks) >= 3
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text in LABELS
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert set(finals[0].model_extra["vlmtune"]["scores"]) == set(LABELS)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    # The wire format itself: SSE `data:` lines, the last one `data: [DONE]`.
    raw = httpx.post(f"{server['base']}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                     json={"messages": messages(image_url), "stream": True, "vlmtune_mode": "score"})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.splitlines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop"


def test_logprobs_in_score_mode_are_the_labels_log_probabilities(client, image_url):
    """OpenAI's logprobs, honoured where the request scores labels: one entry, the answer label, with log P(label) and
    the most probable labels as top_logprobs; streamed on the content chunk. Neutral values of the parameters this
    server cannot honour (no tools, plain text, no penalties) are accepted."""
    import math

    neutral = {"vlmtune_mode": "score", "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
               "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
    completion = client.chat.completions.create(model="m", messages=messages(image_url), logprobs=True, top_logprobs=2,
                                                extra_body=neutral)
    answer, scores = completion.choices[0].message.content, completion.model_extra["vlmtune"]["scores"]
    (entry,) = completion.choices[0].logprobs.content
    assert entry.token == answer and entry.bytes == list(answer.encode())
    assert math.exp(entry.logprob) == pytest.approx(scores[answer], rel=1e-6)
    assert [top.token for top in entry.top_logprobs] == sorted(LABELS, key=lambda label: -scores[label])
    for top in entry.top_logprobs:
        assert math.exp(top.logprob) == pytest.approx(scores[top.token], rel=1e-6)
    one = client.chat.completions.create(model="m", messages=messages(image_url), logprobs=True,
                                         extra_body={"vlmtune_mode": "score"})
    assert one.choices[0].logprobs.content[0].top_logprobs == []
    chunks = list(client.chat.completions.create(model="m", messages=messages(image_url), stream=True, logprobs=True,
                                                 top_logprobs=1, extra_body={"vlmtune_mode": "score"}))
    streamed = [c.choices[0].logprobs.content for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(streamed) == 1 and streamed[0][0].token == answer and len(streamed[0][0].top_logprobs) == 1
    plain = client.chat.completions.create(model="m", messages=messages(image_url),
                                           extra_body={"vlmtune_mode": "score"})
    assert plain.choices[0].logprobs is None


def test_models_lists_the_served_model(client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["tiny-judge"]
    assert listed.data[0].object == "model"


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert {"type", "code"} <= set(body["error"])
    assert "Traceback" not in response.text
    return body["error"]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(client, server, image_url):
    url = f"{server['base']}/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}

    # Malformed JSON (raw HTTP: the client always sends valid JSON).
    response = httpx.post(url, content=b'{"messages": [', headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"

    # Valid JSON, wrong schema: through the client.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.status_code == 400 and "messages[0].role" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[])

    # Oversize body.
    big = "data:image/png;base64," + base64.b64encode(bytes(MAX_BYTES)).decode()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="m", messages=messages(big))
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"

    # Without the key, and with a wrong one.
    response = httpx.post(url, json={"messages": messages(image_url)})
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    assert httpx.get(f"{server['base']}/models").status_code == 401
    stranger = openai.OpenAI(base_url=server["base"], api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.chat.completions.create(model="m", messages=messages(image_url))
    assert caught.value.status_code == 401

    # Image sources other than data: URLs are refused by default, with a message that says what to do.
    for other in ("http://example.com/scene.png", "file:///etc/hostname", "/etc/hostname"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="m", messages=messages(other))
        assert "data: URL" in caught.value.message
    # A data: URL that is not an image, and placeholders that do not match the image parts.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=messages("data:image/png;base64,aGVsbG8="))
    assert "not a readable image" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=messages(image_url, "<image><image>" + RULES_PROMPT))
    assert "placeholder" in caught.value.message
    # Score mode with labels that cannot be told apart.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=messages(image_url),
                                       extra_body={"vlmtune_mode": "score", "vlmtune_labels": ["a", "a"]})
    # Unknown route: OpenAI's error shape too.
    response = httpx.get(f"{server['base']}/nothing-here", headers=auth)
    assert response.status_code == 404 and error_of(response)

    # Still serving, and never a 500.
    assert server["proc"].poll() is None
    completion = client.chat.completions.create(model="m", messages=messages(image_url),
                                                extra_body={"vlmtune_mode": "score"})
    assert completion.choices[0].message.content in LABELS
    log = Path(server["log"]).read_text()
    assert " 500 " not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_family_answers_as_its_adapter_learned(tiny_models, label_adapters, rules_dir, arch, tmp_path):
    """base + label adapter of each family behind the API: score and generate give the answer each rules
    prompt asks for (Qwen3-VL: with its deepstack features and chat template; Qwen3.5: left-padded prompts for its
    linear-attention state, and its thinking template)."""
    from vlmtune.data.loader import load_datasets

    port = free_port()
    args = ["api", "--model_name_or_path", str(tiny_models(arch)), "--adapter_name_or_path", str(label_adapters(arch)),
            "--labels", ",".join(LABELS), "--port", str(port)]
    convs = load_datasets("rules", str(rules_dir), 4).conversations
    with running(args, f"http://127.0.0.1:{port}/health", tmp_path / "api.log"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        for conv in convs:
            url = "data:image/png;base64," + base64.b64encode(Path(conv.images[0]).read_bytes()).decode()
            asked = [{"role": m.role, "content": m.content} for m in conv.messages[:-1]]
            asked[-1] = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": asked[-1]["content"]}]}
            scored = client.chat.completions.create(model="m", messages=asked, extra_body={"vlmtune_mode": "score"})
            generated = client.chat.completions.create(model="m", messages=asked, max_tokens=8)
            assert scored.choices[0].message.content == generated.choices[0].message.content == conv.answer


def test_out_of_memory_is_a_503_with_the_cache_emptied_and_the_server_goes_on(tiny_model_dir, image_url, monkeypatch):
    """A request the GPU has no memory for (stood in for: the model's forward raises torch's OutOfMemoryError, one
    CUDA device reported) gets a JSON 503 saying so, not a bare 500; the allocator's cache is emptied; the next
    request is answered. In-process: the app `vlmtune api` serves."""
    import torch
    from fastapi.testclient import TestClient

    from vlmtune.infer.engine import load_engine
    from vlmtune.serve.api import create_app
    from vlmtune.serve.common import ModelService

    service = ModelService(load_engine(str(tiny_model_dir), log=lambda *_: None), LABELS)
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def no_memory(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = service.engine.model.register_forward_pre_hook(no_memory)
    client = TestClient(create_app(service, "tiny-judge", default_mode="score"))
    body = {"model": "tiny-judge", "messages": messages(image_url)}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "out_of_memory" and "ran out of GPU memory" in error["message"] and emptied == [True]
    hook.remove()
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] in LABELS
