"""Uploaded images, data: URLs and OpenAI messages, without a server."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtune.data.images import load_resized
from vlmtune.data.processor import load_processor
from vlmtune.serve.common import RequestError, decode_data_url, resize_image

pytest.importorskip("pydantic")


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir, max_pixels=200 * 200)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("RGB", "JPEG")])
def test_uploaded_image_resized_like_a_file(processor, tmp_path, mode, fmt):
    """Bytes from a data: URL → the same tensor as `load_resized` of the same file (what training sees)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (173, 251, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / f"img.{fmt.lower()}"
    image.save(path, format=fmt)
    from_file = load_resized(path, processor.image_processor)
    url = f"data:image/{fmt.lower()};base64," + base64.b64encode(path.read_bytes()).decode()  # the file's bytes
    from_url = resize_image(decode_data_url(url), processor.image_processor)
    assert from_url.dtype == torch.uint8 and from_url.shape == from_file.shape
    assert from_file.shape[1] * from_file.shape[2] <= 200 * 200
    assert torch.equal(from_url, from_file)


@pytest.mark.parametrize("url, fragment", [
    ("data:image/png,plain", "base64"),
    ("data:image/png;base64", "malformed"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "media type"),
    ("data:image/png;base64,aGVsbG8=", "not a readable image"),
    ("data:image/png;base64,", "empty"),
])
def test_bad_data_urls_are_request_errors(url, fragment):
    with pytest.raises(RequestError, match=fragment):
        decode_data_url(url, "img")


def test_openai_messages_to_conversation():
    from vlmtune.serve.api import ImagePolicy, _schema, convert_messages

    ChatRequest = _schema()
    url = data_url(Image.new("RGB", (64, 48), "red"))
    policy = ImagePolicy()

    def convert(messages):
        return convert_messages(ChatRequest.model_validate({"messages": messages}).messages, policy)

    image = {"type": "image_url", "image_url": {"url": url}}
    msgs, images = convert([{"role": "developer", "content": "sys"},
                            {"role": "user", "content": [{"type": "text", "text": "a"}, image,
                                                         {"type": "text", "text": "b"}, image]}])
    assert [(m.role, m.content) for m in msgs] == [("system", "sys"), ("user", "a<image>b<image>")]
    assert len(images) == 2 and images[0].size == (64, 48)
    # Placeholders in the text (the dataset's own prompt) place the images when the counts agree.
    msgs, images = convert([{"role": "user", "content": [image, {"type": "text", "text": "x<image>y"}]}])
    assert msgs[0].content == "x<image>y" and len(images) == 1
    for bad, fragment in [
        ([{"role": "user", "content": [image, {"type": "text", "text": "<image><image>"}]}], "placeholder"),
        ([{"role": "user", "content": "<image>judge"}], "no image part"),
        ([{"role": "assistant", "content": [image]}, {"role": "user", "content": "x"}], "only accepted in user"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
         "only accepted first"),
    ]:
        with pytest.raises(RequestError, match=fragment):
            convert(bad)


def test_image_sources_need_the_operator_s_permission(tmp_path):
    from vlmtune.serve.api import ImagePolicy

    path = tmp_path / "local.png"
    Image.new("RGB", (40, 30), "blue").save(path)
    with pytest.raises(RequestError, match="--allow_local_images"):
        ImagePolicy().open(str(path), "img")
    with pytest.raises(RequestError, match="--allow_remote_images"):
        ImagePolicy().open("https://example.com/a.png", "img")
    allowed = ImagePolicy(allow_local=True)
    assert allowed.open(str(path), "img").size == (40, 30)
    assert allowed.open(path.as_uri(), "img").size == (40, 30)
    with pytest.raises(RequestError, match="cannot read"):
        allowed.open(str(tmp_path / "missing.png"), "img")


def test_llama_factorys_inference_yaml_starts_the_servers_with_its_template(tiny_models, capsys):
    """`llamafactory-cli api|webchat examples/inference/qwen3vl.yaml` → `vlmtune api|webui` with that YAML (its
    model path overridden): the YAML's template is the one served; flags override the YAML, overrides too."""
    from pathlib import Path

    from vlmtune.commands import api, webui
    from vlmtune.commands.serving import server_settings
    from vlmtune.serve.common import ModelService

    yaml_path = Path(__file__).parents[1] / "fixtures" / "llamafactory" / "examples" / "inference" / "qwen3vl.yaml"
    model = tiny_models("qwen3_vl")
    for command in (api, webui):
        args = command.build_parser().parse_args([str(yaml_path), f"model_name_or_path={model}", "max_new_tokens=7",
                                                  "--max_new_tokens", "9", "--labels", "满足要求,不满足要求"])
        settings, labels = server_settings(args, 1234)
        assert (settings.model_name_or_path, settings.template, settings.max_new_tokens) == (str(model),
                                                                                          "qwen3_vl_nothink", 9)
        assert labels == ["满足要求", "不满足要求"] and settings.enable_thinking is None
    service = ModelService.from_args(settings, labels, log=lambda *_: None)
    assert service.processor.template.label.startswith("qwen3_vl_nothink")
    thinking = api.build_parser().parse_args([str(yaml_path), f"model_name_or_path={model}", "template=qwen3_vl",
                                              "infer_backend=vllm"])
    settings, _ = server_settings(thinking, 1234)
    assert settings.template == "qwen3_vl" and "infer_backend: vllm" in capsys.readouterr().err
