"""Load a supported model (`vlmtune.families`) from a local directory or a hub id, in the dtype the run asks
for — the same code for every family: `AutoModelForImageTextToText` maps each `model_type` to its transformers
class."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from vlmtune.errors import VlmtuneError, brief
from vlmtune.families import family_of_type, parts_of


def resolve_model_dir(name_or_path: str | None, cache_dir: str | None = None, revision: str = "main") -> Path:
    """A local directory for the model: as given, or downloaded from the hub.

    USE_MODELSCOPE_HUB=1 fetches from ModelScope (the seed user's `/data/modelscope/...` paths come from
    there); otherwise from Hugging Face. Both use their own caches, so a second call is local.
    """
    if not name_or_path:
        raise VlmtuneError("model_name_or_path is not set")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise VlmtuneError(f"{path}: no config.json (not a model directory)")
        return path
    if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1:
        raise VlmtuneError(f"{name_or_path}: model directory not found")
    try:
        if os.environ.get("USE_MODELSCOPE_HUB", "0").lower() in ("1", "true"):
            from modelscope import snapshot_download as ms_download

            return Path(ms_download(name_or_path, revision=None if revision == "main" else revision,
                                    cache_dir=cache_dir))
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir))
    except ImportError as exc:
        raise VlmtuneError(f"{name_or_path}: downloading needs '{exc.name}' (pip install vlmtune[modelscope])") from None
    except Exception as exc:  # network, auth, missing repo: one line, not a traceback
        raise VlmtuneError(f"{name_or_path}: cannot download the model ({exc.__class__.__name__}: "
                           f"{brief(exc)})") from None


def compute_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    return torch.float32


HALF_DTYPES = (torch.float16, torch.bfloat16)  # what flash-attention computes in (it refuses float32)


def flash_attention_problem() -> str | None:
    """Why flash_attention_2 cannot run here (no CUDA device, a flash-attn transformers does not accept — missing
    or older than 2.3.3 —, a GPU older than Ampere, a wheel that does not import), or None."""
    if not torch.cuda.is_available():
        return "there is no CUDA device"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "flash-attn is not installed (or older than 2.3.3, which transformers refuses)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the GPU (compute capability {major}.{minor}) is older than Ampere, which flash-attn needs"
    try:
        import flash_attn  # noqa: F401  (a wheel built for another torch fails here: undefined symbol)
    except Exception as exc:  # noqa: BLE001
        return f"flash-attn does not import ({brief(exc, 120)})"
    return None


def pick_attention(requested: str, dtype: torch.dtype = torch.float32) -> str:
    """The attention for a model computing in `dtype`. auto: flash_attention_2 where it runs (a GPU from Ampere on,
    with a flash-attn transformers accepts) and the dtype is fp16 or bf16, sdpa otherwise. flash_attention_2 asked
    for where it cannot run (LLaMA-Factory YAMLs say `flash_attn: fa2` whatever the machine) becomes sdpa, said in
    one line, as LLaMA-Factory does; asked for with float32 where it would run, it is refused (flash-attention
    refuses float32 at the first forward)."""
    if requested not in ("auto", "flash_attention_2"):
        return requested
    problem = flash_attention_problem()
    if requested == "auto":
        return "flash_attention_2" if problem is None and dtype in HALF_DTYPES else "sdpa"
    if problem is not None:
        print(f"note: attn_implementation flash_attention_2 (flash_attn: fa2): {problem}; using sdpa", file=sys.stderr,
              flush=True)
        return "sdpa"
    if dtype not in HALF_DTYPES:
        raise VlmtuneError(f"attn_implementation flash_attention_2 (flash_attn: fa2) computes in bf16 or fp16 only, "
                           f"and this model runs in {str(dtype).replace('torch.', '')}: set bf16: true (or fp16: "
                           f"true), or attn_implementation: sdpa")
    return "flash_attention_2"


def read_model_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise VlmtuneError(f"{model_dir / 'config.json'}: cannot read ({brief(exc)})") from None
    family_of_type(config.model_type, str(Path(model_dir) / "config.json"))  # one line for an unsupported one
    return config


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "auto",
               device: torch.device | str | None = None, quantization=None):
    """The base model with weights. Weights stay in `dtype` (bf16 on GPUs halves memory). With `quantization`
    (a `model.quantize.Quantization`, QLoRA) the language model's linear layers are loaded quantized by
    bitsandbytes, straight onto `device` (default: the CPU) — bitsandbytes quantizes as the weights arrive there
    and a quantized model is not moved afterwards."""
    from transformers import AutoModelForImageTextToText

    config = read_model_config(model_dir)
    family = family_of_type(config.model_type)
    note = missing_kernels_note(family)
    if note is not None:
        print(f"note: {note}", file=sys.stderr, flush=True)
    placement = {}
    if device is not None and quantization is None and torch.device(device).type != "cpu":
        # Straight onto the device: loaded on the host first, 8 ranks would hold 8 copies of the model in host RAM.
        placement = {"device_map": {"": torch.device(device)}}
    if quantization is not None:
        from vlmtune.model.quantize import bnb_config

        placement = {"quantization_config": bnb_config(quantization, dtype, family.layout),
                     "device_map": {"": torch.device(device if device is not None else "cpu")}}
    model = AutoModelForImageTextToText.from_pretrained(
        str(model_dir), dtype=dtype, attn_implementation=pick_attention(attn_implementation, dtype), **placement)
    if device is not None and not placement:
        model.to(device)
    if quantization is not None:
        from vlmtune.model.quantize import guard_cpu_packing

        guard_cpu_packing(model)
    guard_fp16_overflow(model)
    return model


def missing_kernels_note(family) -> str | None:
    """On a CUDA machine, one line naming the GPU kernels the family's layers want that are not installed (Qwen3.5's
    linear attention: flash-linear-attention, causal-conv1d) and what their absence costs; None elsewhere (a CPU
    runs transformers' torch path in any case) or when they are all there."""
    import importlib.util

    if not family.kernels or not torch.cuda.is_available():
        return None
    missing = [pip for module, pip in family.kernels if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return f"{family.name}: {', '.join(missing)} not installed; {family.kernels_note}"


def guard_fp16_overflow(model) -> int:
    """Clamp the vision blocks' outputs to float16's range where they overflow, as vLLM and LLaMA-Factory
    guard Qwen2.5-VL's vision tower in fp16 (its activations outgrow 65,504 in the deeper blocks of the
    releases; transformers does not guard them, and an inf there makes every answer NaN). A forward hook
    on each block that acts only on float16 outputs with an inf: bf16 and fp32 runs never pay for it.
    Returns the number of blocks guarded."""
    blocks = getattr(parts_of(model).vision_tower, "blocks", None) or []

    for block in blocks:
        block.register_forward_hook(lambda _module, _inputs, output: clamp_fp16_overflow(output))
    return len(blocks)


def clamp_fp16_overflow(hidden):
    """`hidden` clamped to ±(float16 max − 1000) when it is float16 and holds an inf (vLLM's rule), else itself.
    The library's block forward gets it as a hook (`guard_fp16_overflow`), vlmtune's vision encoder after
    each block."""
    if isinstance(hidden, torch.Tensor) and hidden.dtype == torch.float16:
        # Chosen on the device (torch.where), never asked on the host: asking would wait for the GPU in every block.
        limit = torch.finfo(torch.float16).max - 1000
        return torch.where(torch.isinf(hidden).any(), hidden.clamp(-limit, limit), hidden)
    return hidden


def build_empty_model(model_dir: Path):
    """The architecture on the meta device (no memory, no weights): for parameter counts.

    Tied word embeddings (Qwen2.5-VL-3B, Qwen3-VL-2B/4B) are tied here as loading ties them: a model
    built under `init_empty_weights` is not, and would count the embedding twice.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    config = read_model_config(model_dir)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    model.tie_weights()
    return model
