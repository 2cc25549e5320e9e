"""The vLLM backend: base model + LoRA adapter on GPUs, tensor parallel, generate and score; under torchrun one
engine per rank on its own GPUs (`rank_gpus`), each rank its share of the rows as with transformers.

vllm is imported only here and only when `--backend vllm` is chosen, so the rest of vlmtune never
needs it. The prompts are the same text the transformers engine renders (the processor's chat
template, `data.template`), with one `<|image_pad|>` per image — vLLM expands it itself, for
Qwen2/2.5-VL and Qwen3-VL alike — and the images are resized here with the adapter's pixel limits,
so both backends see the same pixels.

* generate: `SamplingParams(temperature=0, max_tokens=...)`, stop at `<|im_end|>`.
* score: one request per (sample, label) whose prompt ends with the label's tokens and
  `<|im_end|>`; `prompt_logprobs=0` returns the log-prob of the prompt's tokens from `prompt_logprob_start` on
  (vLLM ≥ 0.34: the label's rows only, the prompt read from the prefix cache its first label request left;
  `scoring_params`), and the sum over the label's tokens is log P(label | prompt), exactly what `infer.scoring`
  computes.

Adapters, as read in the vLLM 0.33.0 and 0.34.0 wheels: vLLM strips peft's `base_model.model.` and maps
`model.language_model.` → `language_model.model.` (`hf_to_vllm_mapper` of the Qwen2.5-VL, Qwen3-VL and Qwen3.5
conditional-generation classes; the MoEs inherit it), then packs q/k/v into `qkv_proj` and gate/up into
`gate_up_proj` — and for Qwen3.5's linear-attention layers (0.34: `models/qwen3_5.py`) `in_proj_qkv` + `in_proj_z`
into `in_proj_qkvz` and `in_proj_b` + `in_proj_a` into `in_proj_ba`, with `out_proj` and the MoE's
`shared_expert_gate` (a ReplicatedLinear) as they are: vlmtune's language-model LoRA (tests/infer/test_vllm.py
checks its keys) loads on every family; LoRA on Qwen3-VL-MoE's experts (`lora_target_experts`) is in peft's 3-D layout, which vLLM's
fused-MoE LoRA reads. Vision-tower LoRA is ignored unless vLLM's `enable_tower_connector_lora` is on.

Before the main run, a few samples are scored with and without the LoRARequest: vLLM has silently
ignored Qwen2.5-VL adapters (module names it did not map), and predictions from the bare base model
look plausible enough to go unnoticed. If the adapter changes nothing, the run stops with an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from vlmtune.errors import VlmtuneError

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # ranks vLLM's LoRA kernels are built for
ADAPTER_EFFECT_MIN = 1e-3  # nats: a smaller change of the answer log-likelihood means "no adapter"


def vllm_available() -> tuple[bool, str]:
    """(usable, why not): vllm importable and a CUDA device present."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False, "vllm is not installed (pip install 'vlmtune[vllm]')"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (vLLM needs a GPU)"
    return True, ""


def rank_gpus(visible: str | None, local_rank: int, per_rank: int = 1) -> str:
    """CUDA_VISIBLE_DEVICES for one torchrun rank's own vLLM engine: its `per_rank` (tensor_parallel_size) GPUs
    of the ones visible to the node (`visible`: CUDA_VISIBLE_DEVICES as launched, None for all)."""
    start = local_rank * per_rank
    if visible is None:
        return ",".join(str(gpu) for gpu in range(start, start + per_rank))
    gpus = [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    if start + per_rank > len(gpus):
        raise VlmtuneError(f"--backend vllm under torchrun: local rank {local_rank} needs GPUs {start}.."
                           f"{start + per_rank - 1} of CUDA_VISIBLE_DEVICES={visible} (tensor_parallel_size "
                           f"{per_rank} each); start fewer processes per node")
    return ",".join(gpus[start:start + per_rank])


def lora_rank_limit(rank: int) -> int:
    """Smallest rank vLLM supports that fits the adapter's rank."""
    for allowed in LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise VlmtuneError(f"LoRA rank {rank} is larger than vLLM supports ({LORA_RANKS[-1]})")


def check_adapter(adapter_dir: Path, adapter_config: dict, vllm_config: dict) -> None:
    """Refuse, before the engine starts, an adapter vLLM would reject inside it or silently apply in part
    (vLLM 0.33: `PEFTHelper` rejects `modules_to_save` other than classifier/score and DoRA; LoRA on the
    vision tower is dropped without a word unless `enable_tower_connector_lora` is on)."""
    fix = (f"merge it with `vlmtune export --adapter_name_or_path {adapter_dir} --export_dir DIR` and predict "
           f"or serve the merged model (no adapter)")
    trained = [m for m in adapter_config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if trained:
        raise VlmtuneError(f"{adapter_dir}: vLLM cannot apply an adapter with fully trained modules "
                           f"({', '.join(trained)}, peft's modules_to_save); {fix}")
    if adapter_config.get("use_dora"):
        raise VlmtuneError(f"{adapter_dir}: vLLM cannot apply a DoRA adapter; {fix}")
    if adapter_has_tower_lora(adapter_dir) and not vllm_config.get("enable_tower_connector_lora"):
        raise VlmtuneError(f"{adapter_dir}: the adapter has LoRA on the vision tower, which vLLM ignores unless "
                           f"--vllm_config '{{\"enable_tower_connector_lora\": true}}' (experimental there); or "
                           f"{fix}")


def adapter_has_tower_lora(adapter_dir: Path) -> bool:
    """True when the adapter's weights include LoRA layers of the vision tower (`.visual.`)."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as weights:
        return any(".visual." in key for key in weights.keys())


def check_tensor_parallel(model_config: dict, size: int, where: str) -> None:
    """vLLM splits attention heads over the GPUs: both the language model's and the vision tower's head
    counts must be multiples of tensor_parallel_size (Qwen2.5-VL-7B: 28 and 16 heads → 1, 2 or 4)."""
    text = model_config.get("text_config") or model_config
    vision = model_config.get("vision_config") or {}
    heads = {"language model": text.get("num_attention_heads"), "vision tower": vision.get("num_heads")}
    heads = {k: int(v) for k, v in heads.items() if v}
    if size < 1 or any(n % size for n in heads.values()):
        fits = [str(t) for t in range(1, max(heads.values(), default=1) + 1) if all(n % t == 0 for n in heads.values())]
        counts = " and ".join(f"the {k}'s {n}" for k, n in heads.items())
        choices = f"{', '.join(fits[:-1])} or {fits[-1]}" if len(fits) > 1 else fits[0]
        raise VlmtuneError(f"{where}: tensor_parallel_size {size} does not divide {counts} attention heads; "
                           f"use {choices}")


def default_max_model_len(longest_sample: int, max_new_tokens: int) -> int:
    """The context vLLM reserves KV cache for: the longest sample of the data (prompt, image tokens and
    answer) plus the answer budget, in blocks of 256 — not the model's 128k or 256k, whose cache alone
    does not fit a 24 GB GPU next to a 7B model."""
    need = longest_sample + max_new_tokens + 16
    return -(-need // 256) * 256


def data_max_model_len(conversations, processor, default_system: str | None, max_new_tokens: int,
                       context: int | None = None) -> int:
    """`default_max_model_len` of the data as it is sent: records without a system turn get `default_system`
    (a rules list can be most of the prompt), so it is counted in. A record longer than the model's `context` is
    refused in one line naming it (a 1 MB one without tokenising it: `data.encode.check_length`)."""
    from vlmtune.data.checks import check_conversations
    from vlmtune.data.encode import EncodeError, check_length
    from vlmtune.infer.runner import record_error

    conversations = list(conversations)
    for conv in conversations:
        try:
            check_length(conv.messages, context, "the model's context", field=conv.messages_field)
        except EncodeError as exc:
            raise record_error(conv, exc) from None
    stats = check_conversations(conversations, processor, default_system=default_system).stats
    for conv in conversations:
        try:
            check_length(conv.messages, context, "the model's context", stats[conv.id].total_tokens if conv.id in stats
                         else None, conv.messages_field)
        except EncodeError as exc:
            raise record_error(conv, exc) from None
    return default_max_model_len(max((s.total_tokens for s in stats.values()), default=0), max_new_tokens)


def engine_kwargs(model_dir: Path, processor, dtype: str, seed: int, max_images: int, max_model_len: int | None,
                  lora_rank: int | None, vllm_config: dict[str, Any]) -> dict[str, Any]:
    """vllm.LLM's arguments: images only (no video slots: vLLM reserves 999 per modality left unset), the data's
    max_model_len, LoRA sized for the adapter, prefix caching (each prompt is sent once per label); the user's
    vllm_config wins."""
    kwargs: dict[str, Any] = dict(
        model=str(model_dir), dtype=dtype, seed=seed, trust_remote_code=True,
        limit_mm_per_prompt={"image": max(1, max_images), "video": 0},
        mm_processor_kwargs={"max_pixels": processor.max_pixels, "min_pixels": processor.min_pixels},
        enable_prefix_caching=True,
    )
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if lora_rank is not None:
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_limit(lora_rank))
    return {**kwargs, **vllm_config}  # the user's settings win (tensor_parallel_size, gpu_memory_utilization, ...)


def vllm_prompt(template, messages, n_images: int, default_system: str | None, mode: str = "generate") -> str:
    """The prompt with one image pad per image, ending with the open assistant turn as `mode` (score or
    generate) needs it (`data.template.Template.render`)."""
    return template.render(messages, [1] * n_images, default_system, prompt=mode).text


class Prompt(NamedTuple):
    """One sample as vLLM gets it: the prompt text (one image pad per image), its images resized, and its length in
    tokens with every image's tokens counted — as vLLM expands the pads (the images are pre-resized)."""

    text: str
    images: list
    tokens: int


def pil_images(conversation, image_processor) -> tuple[list, list[int]]:
    """The conversation's images, decoded and resized exactly as the transformers engine does, and each one's
    image tokens."""
    from PIL import Image

    from vlmtune.data.images import ImageError, load_resized, resized_token_count

    out, counts = [], []
    for i, path in enumerate(conversation.images):
        try:
            chw = load_resized(path, image_processor)
        except ImageError as exc:
            raise VlmtuneError(f"{conversation.source}: record {conversation.index}: field 'images[{i}]': "
                               f"{exc}: {path}") from None
        out.append(Image.fromarray(chw.permute(1, 2, 0).numpy()))
        counts.append(resized_token_count(chw.shape[1], chw.shape[2], image_processor))
    return out, counts


def scoring_params(sampling_params, prompt_tokens: int):
    """SamplingParams of a label request (the prompt, then the label and the turn end): the log-prob of each label
    token from `prompt_logprobs`. vLLM ≥ 0.34 scores only the rows from `prompt_logprob_start` on — the prompt's
    last row, which predicts the label's first token — and reads the shared prompt's cache before it (with
    `skip_reading_prefix_cache=False`; without a start it reads none and scores every row). Older vLLM: without
    the start, or the oldest without either."""
    base = dict(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    for extra in ({"prompt_logprob_start": max(0, prompt_tokens - 1), "skip_reading_prefix_cache": False},
                  {"skip_reading_prefix_cache": False}):
        try:
            return sampling_params(**base, **extra)
        except TypeError:  # an older vLLM without the field
            continue
    return sampling_params(**base)


class VllmPredictor:
    """Same interface as runner.TransformersPredictor: `prepare`, `check`, `score`, `generate`, `close`."""

    def __init__(self, llm, processor, model_dir: Path, adapter_dir: Path | None, lora_request, dtype_name: str,
                 log=print):
        self.llm = llm
        self.processor = processor
        self.model_dir = model_dir
        self.adapter_dir = adapter_dir
        self.lora_request = lora_request
        self.max_pixels = processor.max_pixels
        self.min_pixels = processor.min_pixels
        self.dtype_name = dtype_name
        self.log = log

    @classmethod
    def load(cls, model_name_or_path: str | None, adapter_name_or_path: str | None,
             image_max_pixels: int | None, image_min_pixels: int | None, bf16: bool = False, fp16: bool = False,
             vllm_config: dict[str, Any] | None = None, cache_dir: str | None = None, revision: str = "main",
             max_images: int = 1, max_model_len: int | None = None, seed: int = 0, template: str | None = None,
             enable_thinking: bool | None = None, conversations=(), max_new_tokens: int = 64,
             default_system: str | None = None, log=print) -> "VllmPredictor":
        ok, why = vllm_available()
        if not ok:
            raise VlmtuneError(f"--backend vllm: {why}; use --backend transformers")
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from vlmtune.data.processor import load_processor
        from vlmtune.infer.engine import resolve_pixel_limits, resolve_template
        from vlmtune.model.adapter_files import adapter_files
        from vlmtune.model.load import resolve_model_dir

        adapter_dir = Path(adapter_name_or_path).expanduser() if adapter_name_or_path else None
        adapter = adapter_files(adapter_dir) if adapter_dir is not None else None
        if not model_name_or_path and adapter is not None:
            model_name_or_path = adapter.base_model
        model_dir = resolve_model_dir(model_name_or_path, cache_dir, revision)
        max_pixels, min_pixels = resolve_pixel_limits(adapter_dir, image_max_pixels, image_min_pixels)
        processor = load_processor(model_dir, max_pixels, min_pixels,
                                   *resolve_template(adapter_dir, template, enable_thinking))
        dtype = "bfloat16" if bf16 else "float16" if fp16 else "auto"
        if max_model_len is None and conversations:
            from vlmtune.data.encode import context_length
            from vlmtune.model.load import read_model_config

            max_model_len = data_max_model_len(conversations, processor, default_system, max_new_tokens,
                                               context_length(read_model_config(model_dir)))
        vllm_config = dict(vllm_config or {})
        if adapter_dir is not None:
            check_adapter(adapter_dir, adapter.config, vllm_config)
        kwargs = engine_kwargs(model_dir, processor, dtype, seed, max_images, max_model_len,
                               adapter.rank if adapter_dir is not None else None, vllm_config)
        from vlmtune.files import read_json_object

        check_tensor_parallel(read_json_object(model_dir / "config.json"), int(kwargs.get("tensor_parallel_size", 1)),
                              "vllm_config")
        log(f"vLLM: {json.dumps({k: v for k, v in kwargs.items() if k != 'model'}, default=str)}")
        try:
            llm = LLM(**kwargs)
        except TypeError as exc:  # an unknown key in vllm_config
            raise VlmtuneError(f"vllm_config: {exc}") from None
        lora = LoRARequest("adapter", 1, str(adapter_dir)) if adapter_dir is not None else None
        log(f"model: {model_dir}" + (f" + adapter {adapter_dir}" if adapter_dir else "") +
            f" (vLLM, {dtype}); image pixels {processor.min_pixels}..{processor.max_pixels}")
        return cls(llm, processor, model_dir, adapter_dir, lora, dtype, log)

    # -- requests -----------------------------------------------------------------------------
    def prepare(self, conversations, default_system=None, mode: str = "score") -> list[Prompt]:
        """Each conversation's prompt: images decoded and resized here, once."""
        from vlmtune.data.encode import prompt_messages
        from vlmtune.data.images import sequence_tokens

        prepared = []
        for conversation in conversations:
            images, counts = pil_images(conversation, self.processor.image_processor)
            text = vllm_prompt(self.processor.template, prompt_messages(conversation), len(images), default_system,
                               mode)
            ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
            prepared.append(Prompt(text, images, sequence_tokens(len(ids), counts)))
        return prepared

    @staticmethod
    def _request(prompt: Prompt, suffix: str = "") -> dict:
        request: dict[str, Any] = {"prompt": prompt.text + suffix}
        if prompt.images:
            request["multi_modal_data"] = {"image": prompt.images}
        return request

    def _sequence_logprobs(self, prepared: list[Prompt], continuations: Sequence[tuple[str, list[int]]],
                           lora) -> list[list[float]]:
        """log P(continuation | prompt) for every (sample, continuation) pair, from prompt_logprobs."""
        from vllm import SamplingParams

        turn_end = self.processor.template.turn_end
        requests = [self._request(prompt, text + turn_end) for prompt in prepared for text, _ in continuations]
        params = [scoring_params(SamplingParams, prompt.tokens) for prompt in prepared for _ in continuations]
        results = self.llm.generate(requests, params, lora_request=lora, use_tqdm=False)
        if any(None in (r.prompt_logprobs or [None])[-len(ids):]
               for r, (_, ids) in zip(results, continuations * len(prepared))):  # a label row came cached or unscored
            plain = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
            results = self.llm.generate(requests, plain, lora_request=lora, use_tqdm=False)
        outputs = iter(results)
        out = []
        for _ in prepared:
            row = []
            for text, ids in continuations:
                result = next(outputs)
                got = list(result.prompt_token_ids[-len(ids):])
                if got != list(ids):
                    raise VlmtuneError(f"vLLM tokenised the label {text!r} differently from the model's tokenizer "
                                       f"({got} vs {list(ids)})")
                positions = result.prompt_logprobs[-len(ids):]
                row.append(sum(pos[token].logprob for pos, token in zip(positions, ids)))
            out.append(row)
        return out

    def check(self, conversations, labels, mode: str, default_system=None) -> None:
        """Stop when the adapter does not change the answer log-likelihoods (vLLM ignored it)."""
        if self.lora_request is None or not conversations:
            return
        from vlmtune.infer.scoring import label_token_ids

        candidates = labels or sorted({(c.answer or "").strip() for c in conversations if (c.answer or "").strip()})
        if not candidates:
            return
        prepared = self.prepare(conversations, default_system, "score")
        continuations = list(zip(candidates, label_token_ids(candidates, self.processor)))
        with_lora = self._sequence_logprobs(prepared, continuations, self.lora_request)
        without = self._sequence_logprobs(prepared, continuations, None)
        change = max(abs(a - b) for ra, rb in zip(with_lora, without) for a, b in zip(ra, rb))
        self.log(f"adapter check: the LoRA changes answer log-likelihoods by up to {change:.4f} nats "
                 f"on {len(conversations)} samples")
        if change < ADAPTER_EFFECT_MIN:
            raise VlmtuneError(
                f"{self.adapter_dir}: vLLM's output is the same with and without the adapter (max change "
                f"{change:.2e} nats on {len(conversations)} samples): vLLM did not apply it (a known problem with "
                f"Qwen2.5-VL adapters on some vLLM versions), or the adapter is untrained; use --backend "
                f"transformers or another vLLM version")

    def score(self, prepared, labels: list[str]) -> list[list[float]]:
        import math

        from vlmtune.infer.scoring import label_token_ids

        continuations = list(zip(labels, label_token_ids(labels, self.processor)))
        probs = []
        for row in self._sequence_logprobs(prepared, continuations, self.lora_request):
            top = max(row)
            exp = [math.exp(v - top) for v in row]
            probs.append([e / sum(exp) for e in exp])
        return probs

    def generate(self, prepared, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0) -> list[str]:
        from vllm import SamplingParams

        # Every setting explicit: Qwen's generation_config.json (repetition_penalty 1.05, top_k 1) must not leak in.
        # top_k 0 is "all tokens" in vlmtune's settings, -1 in vLLM's.
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k or -1, seed=seed) if temperature > 0 else \
            dict(temperature=0.0)
        params = SamplingParams(**sampling, repetition_penalty=repetition_penalty, max_tokens=max_new_tokens,
                                stop_token_ids=self.processor.stop_token_ids(), skip_special_tokens=True)
        requests = [self._request(prompt) for prompt in prepared]
        outputs = self.llm.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
        return [self.processor.template.answer_of(result.outputs[0].text) for result in outputs]

    def close(self) -> None:
        self.llm = None
