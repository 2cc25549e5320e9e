"""`vlmtune export`: the merged checkpoint computes what base + adapter computes, and loads as a plain model
of the base's family with the chat template that serves what training rendered (every family of the registry, the
MoEs with and without LoRA on their experts); a Qwen3.5 checkpoint's MTP layer and float32 tensors survive."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers import ALL_ARCHS, assert_one_line_error, make_dataset, run_cli
from vlmtune.config import FinetuneConfig
from vlmtune.data.encode import Collator, encode_prompt, load_images, prompt_messages
from vlmtune.data.loader import load_datasets
from vlmtune.data.processor import load_processor
from vlmtune.families import TINY_DEFAULT, family_of_type
from vlmtune.model.adapters import apply_finetuning
from vlmtune.model.load import load_model

ADAPTER_MAX_PIXELS = 128 * 128  # differs from the tiny model's default: the export must keep the adapter's
CASES = [*ALL_ARCHS, *(f"{arch}+experts" for arch in ALL_ARCHS if "moe" in arch)]


@pytest.fixture(scope="module", params=CASES)
def case(request, tiny_models):
    arch, _, experts = request.param.partition("+")
    return arch, tiny_models(arch), bool(experts)


@pytest.fixture(scope="module")
def tiny_model_dir(case):
    return case[1]


@pytest.fixture(scope="module")
def adapter_dir(case, tmp_path_factory):
    """A LoRA adapter as vlmtune trains it (language-model linears, r=8; the experts too where asked) + a fully
    trained lm_head copy, with random non-zero weights (a fresh LoRA's B is zero, which would make any merge
    trivially right)."""
    _, tiny_model_dir, experts = case
    out = tmp_path_factory.mktemp("export") / "adapter"
    torch.manual_seed(1)
    model = apply_finetuning(load_model(tiny_model_dir), FinetuneConfig(lora_rank=8, lora_alpha=16,
                                                                        additional_target="lm_head",
                                                                        lora_target_experts=experts),
                             log=lambda *_: None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(out)
    load_processor(tiny_model_dir, max_pixels=ADAPTER_MAX_PIXELS).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exported(case, tiny_model_dir, adapter_dir, tmp_path_factory):
    """The export in float32: from a shell for the default family, in this process for the others (the same code
    without 4 s of imports)."""
    from vlmtune.model.export import export

    out = tmp_path_factory.mktemp("export") / "merged"
    if case[0] == TINY_DEFAULT and not case[2]:
        result = run_cli("export", "--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path",
                         str(adapter_dir), "--export_dir", str(out), "--export_dtype", "float32")
        assert result.returncode == 0, result.stderr
        assert "exported to" in result.stdout
    else:
        lines = []
        export(str(tiny_model_dir), str(adapter_dir), out, export_dtype="float32", log=lines.append)
        assert any("exported to" in line for line in lines)
    return out


@pytest.fixture(scope="module")
def batch(tiny_model_dir, adapter_dir, tmp_path_factory):
    """Three prompts with images of two sizes, left padded: what prediction runs."""
    processor = load_processor(adapter_dir)  # the adapter's pixel limits
    data = make_dataset(tmp_path_factory.mktemp("export-data") / "data", n=3)
    conversations = load_datasets("my_dataset", str(data), None).conversations
    samples = [encode_prompt(prompt_messages(c), load_images(c, processor), processor) for c in conversations]
    out = Collator(processor, padding_side="left")(samples).model_inputs()
    assert out["pixel_values"].shape[0] > 0 and len({len(s) for s in samples}) > 1
    return out


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def test_merged_logits_equal_base_plus_adapter(case, tiny_model_dir, adapter_dir, exported, batch):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = logits(load_model(tiny_model_dir), batch)
    with_adapter = logits(PeftModel.from_pretrained(load_model(tiny_model_dir), str(adapter_dir)), batch)
    assert (with_adapter - base).abs().max() > 1e-2  # the adapter changes the answer: the test can fail
    # vlmtune's ordinary loading code: a plain model of the family, no adapter.
    merged_model = load_model(exported)
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    merged = logits(merged_model, batch)
    assert (merged - with_adapter).abs().max() < 1e-4
    # And plain transformers.
    plain = AutoModelForImageTextToText.from_pretrained(str(exported))
    assert type(plain).__name__ == type(load_model(tiny_model_dir)).__name__
    assert (logits(plain, batch) - with_adapter).abs().max() < 1e-4


def test_export_is_a_standard_checkpoint(case, tiny_model_dir, exported, adapter_dir, batch):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "chat_template.jinja", "chat_template.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == case[0] and config["dtype"] == "float32"
    with safe_open(str(exported / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and not [k for k in keys if "lora" in k or "base_layer" in k or "modules_to_save" in k]
    # The processor is the adapter's: same pixel limits, so the same image tokens as in training.
    processor = load_processor(exported)
    assert processor.max_pixels == ADAPTER_MAX_PIXELS
    # ... and the chat template is the base model's own (with its thinking default as training rendered, where the
    # family's checkpoints think), as `apply_chat_template` and vLLM read it.
    from transformers import AutoTokenizer

    family, trained = family_of_type(case[0]), load_processor(adapter_dir).template
    own = (tiny_model_dir / "chat_template.jinja").read_text()
    served = family.served_chat_template(own, trained.spec, trained.enable_thinking) if family.served_chat_template \
        else own
    assert (exported / "chat_template.jinja").read_text() == served
    assert json.loads((exported / "chat_template.json").read_text())["chat_template"] == served
    assert AutoTokenizer.from_pretrained(str(exported)).chat_template == served == processor.tokenizer.chat_template
    assert processor.template.name == load_processor(tiny_model_dir).template.name
    info = json.loads((exported / "vlmtune_export.json").read_text())
    assert info["adapter"] == str(adapter_dir.resolve()) and info["dtype"] == "float32"


def test_non_empty_export_dir_is_refused(tiny_model_dir, adapter_dir, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    result = run_cli("export", "--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path",
                     str(adapter_dir), "--export_dir", str(target))
    assert_one_line_error(result, "not empty", "--overwrite")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    result = run_cli("export", "--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path",
                     str(adapter_dir), "--export_dir", str(adapter_dir), "--overwrite")
    assert_one_line_error(result, "adapter directory itself")


def test_llamafactory_export_yaml_with_legacy_format(case, tiny_model_dir, adapter_dir, exported, batch, tmp_path,
                                                    capsys):
    """LLaMA-Factory's export YAML (examples/merge_lora/qwen3vl_lora_sft.yaml's keys, paths changed) works with
    `vlmtune export CONFIG.yaml`; export_legacy_format: true writes PyTorch .bin weights that load to the same model."""
    import yaml
    from transformers import AutoModelForImageTextToText

    from helpers import TEMPLATE_OF, run_inline

    if case != (TINY_DEFAULT, tiny_model_dir, False):
        pytest.skip("the YAML's keys are the same for every family: tested on the default one")
    out = tmp_path / "merged-bin"
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(adapter_dir),
        "template": TEMPLATE_OF[TINY_DEFAULT], "trust_remote_code": True,
        "export_dir": str(out), "export_size": 5, "export_device": "cpu", "export_legacy_format": True}))
    result = run_inline(capsys, "export", config)
    assert result.returncode == 0, result.stderr
    assert "export_legacy_format" in result.stdout
    names = {p.name for p in out.iterdir()}
    assert "pytorch_model.bin" in names and not [n for n in names if n.endswith(".safetensors")]
    plain = AutoModelForImageTextToText.from_pretrained(str(out))
    assert (logits(plain, batch) - logits(load_model(exported), batch)).abs().max() < 1e-5


def test_overwrite_in_bfloat16_replaces_stale_shards(tiny_model_dir, adapter_dir, tmp_path):
    from vlmtune.model.export import export

    target = tmp_path / "again"
    target.mkdir()
    (target / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    (target / "notes.txt").write_text("keep me")
    export(str(tiny_model_dir), str(adapter_dir), target, export_dtype="bfloat16", overwrite=True, log=lambda *_: None)
    names = {p.name for p in target.iterdir()}
    assert "model-00002-of-00002.safetensors" not in names and {"model.safetensors", "notes.txt"} <= names
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(target / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}


def test_generation_prompt_of_the_export_is_the_trained_one(case, exported, adapter_dir):
    """`apply_chat_template(..., add_generation_prompt=True)` of the exported tokenizer — what vLLM and transformers
    serving the merged model ask — gives exactly the prompt training rendered (with and without a system turn)."""
    from transformers import AutoTokenizer

    from vlmtune.data.conversation import Message

    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    trained = load_processor(adapter_dir).template
    for messages in ([Message("user", "判断以上图片是否满足要求")],
                     [Message("system", "你是检查助手。"), Message("user", "判断以上图片是否满足要求")]):
        served = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                               tokenize=False, add_generation_prompt=True)
        assert served == trained.render(messages, [], prompt="generate").text, (case[0], served)


# ---------------------------------------------------------------------------------------------
# A Qwen3.5 checkpoint as released: bfloat16, float32 linear-attention A_log and norms, and an MTP layer.


@pytest.fixture(scope="module")
def released_like(tiny_models, tmp_path_factory):
    """The tiny Qwen3.5 rewritten as the releases store it: bf16 with float32 `linear_attn.A_log` and
    `linear_attn.norm.weight`, plus an `mtp.*` layer that transformers does not load."""
    import shutil

    from safetensors.torch import load_file, save_file

    arch = next(a for a in ALL_ARCHS if family_of_type(a).recurrent_state)
    out = shutil.copytree(tiny_models(arch), tmp_path_factory.mktemp("released") / "qwen3_5")
    tensors = load_file(str(out / "model.safetensors"))
    wide = ("linear_attn.A_log", "linear_attn.norm.weight")
    tensors = {k: v if k.endswith(wide) else v.to(torch.bfloat16) for k, v in tensors.items()}
    generator = torch.Generator().manual_seed(3)
    tensors["mtp.fc.weight"] = torch.randn(128, 256, generator=generator).to(torch.bfloat16)
    tensors["mtp.norm.weight"] = torch.randn(128, generator=generator).to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def released_adapter(released_like, tmp_path_factory):
    out = tmp_path_factory.mktemp("released") / "adapter"
    torch.manual_seed(2)
    model = apply_finetuning(load_model(released_like), FinetuneConfig(lora_rank=8, lora_alpha=16),
                             log=lambda *_: None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(out)
    load_processor(released_like, max_pixels=ADAPTER_MAX_PIXELS).save_pretrained(out)
    return out


def headers(path) -> dict:
    from vlmtune.model.export import tensor_files

    return {name: (dtype, tuple(read_shape(file, name))) for name, (file, dtype) in tensor_files(path).items()}


def read_shape(file, name):
    with safe_open(str(file), "pt") as handle:
        return handle.get_slice(name).get_shape()


def test_export_keeps_what_transformers_drops(released_like, released_adapter, tmp_path, capsys):
    """The merged checkpoint has the base's tensor names, shapes and dtypes (MTP layer copied as it is, float32
    tensors kept float32 and, where the adapter did not change them, bit for bit), and computes base + adapter."""
    from peft import PeftModel

    from vlmtune.model.export import export, tensor_files

    merged = tmp_path / "merged"
    export(str(released_like), str(released_adapter), merged, log=print)
    assert "copied 2 tensor(s)" in capsys.readouterr().out
    base, out = headers(released_like), headers(merged)
    assert out == base
    assert out["model.language_model.layers.0.linear_attn.A_log"][0] == "F32"
    files, base_files = tensor_files(merged), tensor_files(released_like)
    for name in ("mtp.fc.weight", "model.language_model.layers.0.linear_attn.A_log",
                 "model.language_model.layers.0.linear_attn.norm.weight"):
        with safe_open(str(files[name][0]), "pt") as a, safe_open(str(base_files[name][0]), "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    # transformers loads it (the MTP layer ignored as in the release), and so does vlmtune
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(str(merged)).config.model_type == "qwen3_5"
    # In float32, the merged model computes what base + adapter computes.
    merged32 = tmp_path / "merged32"
    export(str(released_like), str(released_adapter), merged32, export_dtype="float32", log=lambda *_: None)
    assert headers(merged32)["mtp.fc.weight"][0] == "BF16"  # copied as the base has it
    processor = load_processor(released_adapter)
    data = make_dataset(tmp_path / "data", n=3)
    conversations = load_datasets("my_dataset", str(data), None).conversations
    samples = [encode_prompt(prompt_messages(c), load_images(c, processor), processor) for c in conversations]
    batch = Collator(processor, padding_side="left")(samples).model_inputs()
    with_adapter = logits(PeftModel.from_pretrained(load_model(released_like), str(released_adapter)), batch)
    assert (with_adapter - logits(load_model(released_like), batch)).abs().max() > 1e-2
    assert (logits(load_model(merged32), batch) - with_adapter).abs().max() < 1e-4


@pytest.fixture(scope="module")
def default_adapter(tiny_models, tmp_path_factory):
    """A random non-zero LoRA adapter of the default family (r=8, language-model linears)."""
    tiny = tiny_models(TINY_DEFAULT)
    out = tmp_path_factory.mktemp("export-default") / "adapter"
    torch.manual_seed(2)
    model = apply_finetuning(load_model(tiny), FinetuneConfig(lora_rank=8, lora_alpha=16), log=lambda *_: None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(out)
    load_processor(tiny).save_pretrained(out)
    return tiny, out


def weights_of(export_dir) -> dict:
    with safe_open(str(export_dir / "model.safetensors"), "pt") as weights:
        return {k: weights.get_tensor(k) for k in weights.keys()}


def test_float32_export_on_a_gpu_merges_in_float32(default_adapter, tmp_path, monkeypatch):
    """`--export_device cuda --export_dtype float32`: the merge runs in float32 as on the CPU (inference's choice
    on a GPU, bf16, would round every weight). The GPU is stood in for: one CUDA device with bf16 reported, and the
    model placed on the CPU where it would have gone to it."""
    import vlmtune.infer.engine as engine
    from vlmtune.model.export import export

    tiny, adapter = default_adapter
    export(str(tiny), str(adapter), tmp_path / "cpu", export_dtype="float32", log=lambda *_: None)
    loaded = []
    real_load_model = engine.load_model

    def load_on_the_cpu(model_dir, dtype, device=None, **kwargs):
        loaded.append((dtype, str(device)))
        return real_load_model(model_dir, dtype=dtype, device="cpu", **kwargs)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: True)
    monkeypatch.setattr(engine, "load_model", load_on_the_cpu)
    export(str(tiny), str(adapter), tmp_path / "gpu", export_dtype="float32", device="cuda", log=lambda *_: None)
    assert loaded == [(torch.float32, "cuda")]
    cpu, gpu = weights_of(tmp_path / "cpu"), weights_of(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys() and all(torch.equal(cpu[k], gpu[k]) for k in cpu)


@pytest.mark.parametrize("device, fragment", [("tpu", "must be cpu, cuda (cuda:N) or auto, got 'tpu'"),
                                              ("cuda:3", "no such CUDA device here")])
def test_an_export_device_that_is_not_here_is_a_one_line_error(default_adapter, tmp_path, capsys, device, fragment):
    from helpers import run_inline

    tiny, adapter = default_adapter
    result = run_inline(capsys, "export", "--model_name_or_path", tiny, "--adapter_name_or_path", adapter,
                        "--export_dir", tmp_path / "out", "--export_device", device)
    assert_one_line_error(result, "--export_device", fragment)
