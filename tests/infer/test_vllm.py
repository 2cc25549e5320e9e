"""The vLLM backend. The real runs need vllm and a CUDA device and are skipped without them; the
parsing of prompt log-probs and the adapter check are tested everywhere against a stand-in engine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest

from helpers import ALL_ARCHS, ONE_PER_FAMILY, assert_one_line_error, run_cli
from vlmtune.cli import main as cli_main
from vlmtune.families import family_of_type

POS, NEG = "满足要求", "不满足要求"


def _vllm_ready() -> tuple[bool, str]:
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed (GPU-only optional extra)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


VLLM_READY, VLLM_WHY = _vllm_ready()
needs_vllm = pytest.mark.skipif(not VLLM_READY, reason=f"vLLM backend: {VLLM_WHY}")


# --- everywhere: a stand-in for vllm.LLM -----------------------------------------------------


class FakeLLM:
    """Tokenises the prompt text like vLLM would and returns a made-up log-prob per prompt token.

    log P(token) = -(id % 7) / 10, minus 1 when a LoRA request is applied and the engine honours it.
    """

    def __init__(self, tokenizer, honours_lora: bool = True, grid: int = 28):
        self.tokenizer = tokenizer
        self.honours_lora = honours_lora
        self.grid = grid  # image sides are multiples of this (28 px Qwen2.5-VL, 32 px Qwen3-VL)
        self.calls = []
        self.prompts = []

    def expanded_ids(self, request) -> list[int]:
        """The prompt's token ids as vLLM sees them: each image pad repeated to its image's tokens."""
        pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        counts = iter([(image.size[0] // self.grid) * (image.size[1] // self.grid)
                       for image in request["multi_modal_data"]["image"]])
        ids = self.tokenizer(request["prompt"], add_special_tokens=False)["input_ids"]
        return [t for token in ids for t in ([token] * next(counts) if token == pad else [token])]

    def logprob(self, token: int, lora) -> float:
        return -(token % 7) / 10 - (1.0 if lora is not None and self.honours_lora else 0.0)

    def generate(self, requests, params, lora_request=None, use_tqdm=False):
        each = [p.kwargs for p in params] if isinstance(params, list) else [params.kwargs] * len(requests)
        assert len(each) == len(requests)
        self.calls.append((len(requests), each if isinstance(params, list) else params.kwargs, lora_request))
        out = []
        for request, kwargs in zip(requests, each):
            assert request["multi_modal_data"]["image"][0].size[0] % self.grid == 0  # pre-resized to the model's grid
            assert request["prompt"].count("<|image_pad|>") == 1  # one pad per image: vLLM expands it
            self.prompts.append(request["prompt"])
            ids = self.expanded_ids(request)
            prompt_logprobs = None
            if kwargs.get("prompt_logprobs") is not None:
                # vLLM 0.34 (v1/engine/logprobs.py, input_processor.py): the first token and the rows before
                # prompt_logprob_start get None; the start must leave a row to score
                start = kwargs.get("prompt_logprob_start") or 0
                assert start < len(ids) - 1
                prompt_logprobs = [None] * (1 + start) + [{t: SimpleNamespace(logprob=self.logprob(t, lora_request))}
                                                          for t in ids[1 + start:]]
            out.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=prompt_logprobs,
                                       outputs=[SimpleNamespace(text=f" {POS}\n")]))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@pytest.fixture(params=[*ONE_PER_FAMILY, *(f"{t}+thinking" for t in ONE_PER_FAMILY if family_of_type(t).thinking_template)])
def predictor_parts(request, tiny_models, rules_dir):
    from vlmtune.data.loader import load_datasets
    from vlmtune.data.processor import load_processor

    arch, _, thinking = request.param.partition("+")
    template = family_of_type(arch).thinking_template if thinking else None
    processor = load_processor(tiny_models(arch), max_pixels=128 * 128, template=template,
                               enable_thinking=True if thinking else None)
    return processor, load_datasets("rules", str(rules_dir), 4).conversations


def test_score_sums_the_label_token_logprobs(fake_vllm, predictor_parts, tiny_model_dir):
    from vlmtune.data.encode import encode_prompt, load_images, prompt_messages
    from vlmtune.infer.scoring import label_token_ids
    from vlmtune.infer.vllm_backend import VllmPredictor

    processor, convs = predictor_parts
    llm = FakeLLM(processor.tokenizer, grid=processor.image_processor.factor)
    predictor = VllmPredictor(llm, processor, tiny_model_dir, None, "lora", "bfloat16", log=lambda *_: None)
    probs = predictor.score(predictor.prepare(convs), [POS, NEG])
    sums = [sum(llm.logprob(t, "lora") for t in ids) for ids in label_token_ids([POS, NEG], processor)]
    import math

    want = [math.exp(s) / sum(math.exp(v) for v in sums) for s in sums]
    assert all(p == pytest.approx(want) for p in probs)
    assert len(llm.calls) == 1 and llm.calls[0][0] == 2 * len(convs)  # one request per (sample, label), no rerun
    assert all(p["prompt_logprobs"] == 0 for p in llm.calls[0][1]) and llm.calls[0][2] == "lora"
    # Each request scores from the prompt's last row on (the label's rows only) and may read the prompt's cache
    # before it: the start is the engine's prompt length (image tokens expanded) - 1.
    engine_prompts = [encode_prompt(prompt_messages(c), load_images(c, processor), processor, prompt="score")
                      for c in convs]
    assert [p["prompt_logprob_start"] for p in llm.calls[0][1]] == [len(e.input_ids) - 1 for e in engine_prompts
                                                                    for _ in (POS, NEG)]
    assert all(p["skip_reading_prefix_cache"] is False for p in llm.calls[0][1])
    # The prompt is the transformers engine's (its chat template; a reasoning one's empty thought for scoring),
    # with one image pad instead of the image's tokens, then the label and <|im_end|>.
    tok = processor.tokenizer
    engine_prompt = engine_prompts[0]
    expanded = tok.decode(engine_prompt.input_ids)
    pads = "<|image_pad|>" * int((engine_prompt.input_ids == processor.image_token_id).sum())
    assert llm.prompts[0] == expanded.replace(pads, "<|image_pad|>") + POS + "<|im_end|>"
    texts = predictor.generate(predictor.prepare(convs), max_new_tokens=4, temperature=0.0, seed=None)
    assert texts == [POS] * len(convs)
    params = llm.calls[-1][1]
    assert params["temperature"] == 0.0 and params["repetition_penalty"] == 1.0 and params["max_tokens"] == 4


def test_adapter_check_stops_when_vllm_ignores_the_adapter(fake_vllm, predictor_parts, tiny_model_dir, tmp_path):
    from vlmtune.errors import VlmtuneError
    from vlmtune.infer.vllm_backend import VllmPredictor

    processor, convs = predictor_parts
    messages = []
    grid = processor.image_processor.factor
    honours = VllmPredictor(FakeLLM(processor.tokenizer, grid=grid), processor, tiny_model_dir, tmp_path, "lora",
                            "bfloat16", log=messages.append)
    honours.check(convs, [POS, NEG], "score")
    assert "changes answer log-likelihoods by up to" in messages[0]
    ignores = VllmPredictor(FakeLLM(processor.tokenizer, honours_lora=False, grid=grid), processor, tiny_model_dir,
                            tmp_path, "lora", "bfloat16", log=lambda *_: None)
    with pytest.raises(VlmtuneError, match="same with and without the adapter"):
        ignores.check(convs, None, "generate")  # generate mode checks the dataset's own answers


def test_vllm_backend_without_vllm_or_gpu_is_a_one_line_error(capsys, tiny_model_dir, rules_dir, tmp_path):
    if VLLM_READY:
        pytest.skip("vllm and a GPU are present")
    code = cli_main(["predict", "--model_name_or_path", str(tiny_model_dir), "--dataset", "rules",
                     "--dataset_dir", str(rules_dir), "--save_name", str(tmp_path / "p.jsonl"), "--backend", "vllm"])
    out = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess([], code, out.out, out.err), "--backend vllm",
                          "--backend transformers")


# The LoRA module names vLLM 0.34.0 expects (vllm/lora/worker_manager.py `_load_adapter`: the model's LoRA-capable
# layers, packed ones expanded by `packed_modules_mapping`): q/k/v → qkv_proj, gate/up → gate_up_proj (Qwen2.5-VL,
# Qwen3-VL and Qwen3.5); Qwen3.5 (vllm/model_executor/models/qwen3_5.py) adds in_proj_qkv + in_proj_z →
# in_proj_qkvz, in_proj_b + in_proj_a → in_proj_ba, and its out_proj and the MoE's shared_expert_gate (a
# ReplicatedLinear) as they are.
VLLM_EXPECTED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj_qkv",
                 "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "shared_expert_gate"}


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_adapter_keys_are_the_ones_vllm_maps(tiny_models, arch):
    """vLLM 0.34 loads a peft adapter by stripping `base_model.model.` and mapping `model.language_model.` →
    `language_model.model.` (Qwen2_5_VL-, Qwen3VL- and Qwen3_5ForConditionalGeneration.hf_to_vllm_mapper, the
    MoEs inherit it), then packs q/k/v, gate/up and Qwen3.5's linear-attention projections (VLLM_EXPECTED). The
    adapter vlmtune trains has exactly such keys: language-model linears only, nothing vLLM would drop
    (vision-tower LoRA) or reject."""
    import re

    import torch
    from peft import get_peft_model_state_dict

    from vlmtune.config import FinetuneConfig
    from vlmtune.model.adapters import apply_finetuning
    from vlmtune.model.load import load_model

    model = apply_finetuning(load_model(tiny_models(arch)), FinetuneConfig(lora_rank=8), log=lambda *_: None)
    saved = get_peft_model_state_dict(model)
    key = re.compile(r"base_model\.model\.model\.language_model\.layers\.\d+\.((self_attn|linear_attn|mlp|"
                     r"mlp\.shared_expert)\.)?(\w+)\.lora_[AB]\.weight")
    matched = [key.fullmatch(k) for k in saved]
    assert saved and all(matched), [k for k, m in zip(saved, matched) if not m][:3]
    assert {m.group(3) for m in matched} <= VLLM_EXPECTED
    assert all(isinstance(v, torch.Tensor) for v in saved.values())


# --- with vllm and a GPU ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights on the language model only (vLLM-loadable)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from vlmtune.data.processor import load_processor
    from vlmtune.model.adapters import lora_target_regex
    from vlmtune.model.load import load_model

    torch.manual_seed(0)
    model = load_model(tiny_model_dir)
    regex, _ = lora_target_regex(model, "all")
    out = tmp_path_factory.mktemp("vllm") / "adapter"
    get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=regex, init_lora_weights=False)) \
        .save_pretrained(out)
    load_processor(tiny_model_dir, max_pixels=112 * 112).save_pretrained(out)
    return out


@needs_vllm
@pytest.mark.gpu
def test_vllm_scores_match_transformers(tmp_path, tiny_model_dir, random_adapter, rules_dir):
    common = ["--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path", str(random_adapter),
              "--dataset", "rules", "--dataset_dir", str(rules_dir), "--max_samples", "8", "--bf16"]
    for backend in ("transformers", "vllm"):
        result = run_cli("predict", *common, "--backend", backend, "--save_name", str(tmp_path / f"{backend}.jsonl"),
                         "--vllm_config", json.dumps({"gpu_memory_utilization": 0.3, "enforce_eager": True}))
        assert result.returncode == 0, result.stderr
    assert "adapter check" in result.stdout
    rows = {b: [json.loads(x) for x in (tmp_path / f"{b}.jsonl").read_text().splitlines()]
            for b in ("transformers", "vllm")}
    for hf, vl in zip(rows["transformers"], rows["vllm"]):
        assert hf["id"] == vl["id"]
        assert vl["scores"][POS] == pytest.approx(hf["scores"][POS], abs=0.05)  # bf16 on both sides


@needs_vllm
@pytest.mark.gpu
def test_vllm_generate_mode(tmp_path, tiny_model_dir, random_adapter, rules_dir):
    result = run_cli("predict", "--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path",
                     str(random_adapter), "--dataset", "rules", "--dataset_dir", str(rules_dir), "--max_samples", "4",
                     "--backend", "vllm", "--mode", "generate", "--max_new_tokens", "4",
                     "--save_name", str(tmp_path / "g.jsonl"),
                     "--vllm_config", json.dumps({"gpu_memory_utilization": 0.3, "enforce_eager": True}))
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 4


# --- the decisions taken before vLLM starts (everywhere: real configs and adapters, no engine) ---------


def saved_adapter(model_dir, out, **lora):
    """An adapter as peft saves it, with LoRA settings of the kind vLLM accepts or refuses."""
    from peft import LoraConfig, get_peft_model

    from vlmtune.model.adapters import lora_target_regex
    from vlmtune.model.load import load_model

    model = load_model(model_dir)
    regex = lora.pop("target_modules", None) or lora_target_regex(model, "all")[0]
    get_peft_model(model, LoraConfig(r=8, target_modules=regex, **lora)).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind, fragment", [
    ({"modules_to_save": ["lm_head"]}, r"fully trained modules \(lm_head"),
    ({"use_dora": True}, "DoRA"),
    ({"target_modules": r".*visual.*\.qkv"}, "LoRA on the vision tower"),
])
def test_adapters_vllm_cannot_apply_are_refused_with_the_fix(tiny_model_dir, tmp_path, kind, fragment):
    from vlmtune.errors import VlmtuneError
    from vlmtune.model.adapter_files import adapter_files
    from vlmtune.infer.vllm_backend import check_adapter

    adapter = saved_adapter(tiny_model_dir, tmp_path / "adapter", **dict(kind))
    with pytest.raises(VlmtuneError, match=fragment) as info:
        check_adapter(adapter, adapter_files(adapter).config, {})
    assert "vlmtune export" in str(info.value) and "\n" not in str(info.value)
    plain = saved_adapter(tiny_model_dir, tmp_path / "plain")
    check_adapter(plain, adapter_files(plain).config, {})  # language-model LoRA: fine
    if "target_modules" in kind:  # tower LoRA with vLLM's option on: allowed
        check_adapter(adapter, adapter_files(adapter).config, {"enable_tower_connector_lora": True})


def test_tensor_parallel_size_is_checked_against_the_heads():
    from helpers import FIXTURES
    from vlmtune.errors import VlmtuneError
    from vlmtune.files import read_json_object
    from vlmtune.infer.vllm_backend import check_tensor_parallel

    seven_b = read_json_object(FIXTURES / "qwen2_5_vl_7b" / "config.json")  # 28 text heads, 16 vision heads
    for size in (1, 2, 4):
        check_tensor_parallel(seven_b, size, "vllm_config")
    with pytest.raises(VlmtuneError, match="tensor_parallel_size 8 does not divide the language model's 28 and the "
                                           "vision tower's 16 attention heads; use 1, 2 or 4"):
        check_tensor_parallel(seven_b, 8, "vllm_config")
    check_tensor_parallel(read_json_object(FIXTURES / "qwen3_vl_8b_instruct" / "config.json"), 8, "vllm_config")


def test_default_max_model_len_comes_from_the_data(tiny_model_dir, rules_dir):
    from vlmtune.data.checks import check_conversations
    from vlmtune.data.loader import load_datasets
    from vlmtune.data.processor import load_processor
    from vlmtune.infer.vllm_backend import default_max_model_len

    processor = load_processor(tiny_model_dir)
    convs = load_datasets("rules", str(rules_dir), None).conversations
    longest = max(s.total_tokens for s in check_conversations(convs, processor).stats.values())
    length = default_max_model_len(longest, 64)
    assert length % 256 == 0 and longest + 64 <= length < longest + 64 + 256 + 16
    assert default_max_model_len(900, 64) == 1024  # the user's ≈880-token samples: 1k, not 128k


def test_scoring_params_fall_back_on_older_vllm():
    """vLLM ≥ 0.34 gets the label requests' start row; older ones (no such field: TypeError, as msgspec raises)
    the cache setting alone, the oldest neither."""
    from vlmtune.infer.vllm_backend import scoring_params

    def vllm_with(*fields):
        def make(**kwargs):
            unknown = set(kwargs) - {"temperature", "max_tokens", "prompt_logprobs", "detokenize", *fields}
            if unknown:
                raise TypeError(f"Unexpected keyword argument {sorted(unknown)[0]!r}")
            return kwargs
        return make

    newest = scoring_params(vllm_with("prompt_logprob_start", "skip_reading_prefix_cache"), 600)
    assert newest["prompt_logprob_start"] == 599 and newest["skip_reading_prefix_cache"] is False
    assert newest["prompt_logprobs"] == 0 and newest["max_tokens"] == 1
    older = scoring_params(vllm_with("skip_reading_prefix_cache"), 600)
    assert "prompt_logprob_start" not in older and older["skip_reading_prefix_cache"] is False
    assert scoring_params(vllm_with(), 600) == {"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0,
                                                "detokenize": False}


def test_engine_is_sized_for_the_prompts_as_sent(tiny_model_dir, tmp_path, monkeypatch):
    """vllm.LLM's arguments as `VllmPredictor.load` builds them (vllm stood in for by a recorder): max_model_len
    counts the default_system that records without a system turn are sent with; no video slots."""
    import torch

    from helpers import record, save_image, write_dataset
    from vlmtune.data.checks import check_conversations
    from vlmtune.data.loader import load_datasets
    from vlmtune.data.processor import load_processor
    from vlmtune.infer.vllm_backend import VllmPredictor

    built = []
    module = types.ModuleType("vllm")
    module.LLM = lambda **kwargs: built.append(kwargs) or SimpleNamespace()
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda *args: args
    for name, value in (("vllm", module), ("vllm.lora", types.ModuleType("vllm.lora")), ("vllm.lora.request", lora)):
        monkeypatch.setitem(sys.modules, name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    save_image(tmp_path / "a.png", (56, 56), seed=1)
    write_dataset(tmp_path, "plain", [record("a.png", POS, system=False) for _ in range(2)])
    convs = load_datasets("plain", str(tmp_path), None).conversations
    rules = "请逐条检查以下要求：" + "；".join(f"第{i}条：图片中不得出现任何与规则{i}相违背的内容" for i in range(1, 80))
    VllmPredictor.load(str(tiny_model_dir), None, None, None, conversations=convs, max_new_tokens=64,
                       default_system=rules, log=lambda *_: None)
    sent = max(s.total_tokens for s in check_conversations(convs, load_processor(tiny_model_dir),
                                                           default_system=rules).stats.values())
    assert built[0]["max_model_len"] >= sent + 64
    assert built[0]["limit_mm_per_prompt"] == {"image": 1, "video": 0}


def test_a_record_longer_than_the_context_is_refused_before_vllm_starts(tiny_model_dir, rules_dir):
    """Issue 25 item 0: a 1 MB record (refused from its length, before the tokenizer runs) or one over the context
    in tokens is one line naming the record, not a max_model_len of millions."""
    from vlmtune.data.loader import load_datasets
    from vlmtune.data.processor import load_processor
    from vlmtune.errors import VlmtuneError
    from vlmtune.infer.vllm_backend import data_max_model_len

    processor = load_processor(tiny_model_dir)
    convs = load_datasets("rules", str(rules_dir), None).conversations
    convs[3].messages[1].content += "x" * 1_000_000
    with pytest.raises(VlmtuneError, match=r"rules.json: record 3: field 'messages': 1,000,.* characters of text, "
                                           r"far more than the model's context of 32,768 tokens"):
        data_max_model_len(convs, processor, None, 64, 32768)
    convs[3].messages[1].content = convs[3].messages[1].content[:-1_000_000]
    with pytest.raises(VlmtuneError, match=r"rules.json: record 0: field 'messages': \d+ tokens .* exceed the "
                                           r"model's context of 50 tokens"):
        data_max_model_len(convs, processor, None, 64, 50)
    assert data_max_model_len(convs, processor, None, 64, 32768) <= 1024
