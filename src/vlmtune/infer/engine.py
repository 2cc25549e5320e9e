"""The transformers engine: base model + optional LoRA adapter + processor, ready to predict.

Image pixel limits matter as much as the weights: an adapter trained on 512×512-pixel images sees
different (more, or fewer) image tokens when the images are resized differently at prediction time.
The trainer saves its processor (`preprocessor_config.json`, with `size.longest_edge` /
`size.shortest_edge` in pixels) next to every adapter it writes, so by default prediction uses the
limits of the adapter it loads; `image_max_pixels` / `image_min_pixels` given explicitly win. The
chat template (`vlmtune_template.json`: its name and enable_thinking) is reused the same way.

By default the adapter is not merged: peft's LoRA layers run next to the frozen weights, which
costs a few percent of speed on a 7B model (more on a small one: two extra small matmuls per
layer) and keeps the base model reusable (the sweep swaps adapters on one loaded base model).
`vlmtune predict` loads one adapter for the whole run and merges it (`merge_adapter=True`, peft's
`merge_adapter`: W + B·A·scale in place, as LLaMA-Factory does for inference); the model stays a
PeftModel, so nothing downstream changes.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmtune.data.processor import Processor, load_processor
from vlmtune.errors import VlmtuneError, brief
from vlmtune.model.adapter_files import ADAPTER_CONFIG, adapter_files
from vlmtune.model.load import compute_dtype, load_model, resolve_model_dir



@dataclass
class Engine:
    """What prediction needs: a model in eval mode, its processor, and where they came from."""

    model: torch.nn.Module  # a peft PeftModel when an adapter is loaded
    processor: Processor
    model_dir: Path
    adapter_dir: Path | None
    device: torch.device
    dtype: torch.dtype


def warn_if_other_base(adapter_dir: Path, model_name_or_path: str, model_dir: Path, warn) -> None:
    """The adapter records the model it was trained on (`base_model_name_or_path`); loading it onto another
    directory or hub id is allowed — it may be a copy — but said in one line on stderr. Weights of another
    shape are refused when they load (`attach_adapter`)."""
    recorded = adapter_files(adapter_dir).base_model
    if not recorded or recorded == model_name_or_path:  # the same directory or hub id as at training
        return
    recorded_dir = Path(recorded).expanduser()
    if recorded_dir.is_dir() and recorded_dir.resolve() == model_dir.resolve():
        return
    warn(f"warning: {adapter_dir}: trained on {recorded} (base_model_name_or_path in {ADAPTER_CONFIG}), now "
         f"loaded onto {model_dir}; if that is another model, its answers may mean little")


def resolve_pixel_limits(adapter_dir: str | Path | None, image_max_pixels: int | None,
                         image_min_pixels: int | None) -> tuple[int | None, int | None]:
    """Explicit limits win; otherwise the adapter's; None means "the base model's processor default"."""
    saved = adapter_files(adapter_dir) if adapter_dir is not None else None
    saved_max, saved_min = (saved.max_pixels, saved.min_pixels) if saved is not None else (None, None)
    max_pixels = image_max_pixels if image_max_pixels is not None else saved_max
    min_pixels = image_min_pixels if image_min_pixels is not None else saved_min
    if max_pixels is not None and min_pixels is not None and min_pixels > max_pixels:
        raise VlmtuneError(f"image_min_pixels ({min_pixels}) is larger than image_max_pixels ({max_pixels})")
    return max_pixels, min_pixels


def resolve_template(adapter_dir: str | Path | None, template: str | None,
                     enable_thinking: bool | None) -> tuple[str | None, bool | None]:
    """Explicit settings win; otherwise the adapter's; None means "the model family's default"."""
    saved = adapter_files(adapter_dir) if adapter_dir is not None else None
    saved_name, saved_thinking = (saved.template, saved.enable_thinking) if saved is not None else (None, None)
    if template is not None:  # the adapter's own template named again: its enable_thinking unless another is given
        return template, saved_thinking if enable_thinking is None and template == saved_name else enable_thinking
    return saved_name, enable_thinking if enable_thinking is not None else saved_thinking


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(device: torch.device, bf16: bool = False, fp16: bool = False) -> torch.dtype:
    """The flags when given; otherwise bf16 on a GPU that has it (fp16 on older ones), fp32 on a CPU."""
    if bf16 or fp16:
        return compute_dtype(bf16, fp16)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def attach_adapter(model: torch.nn.Module, adapter_dir: str | Path, model_dir: str | Path | None = None):
    """Wrap `model` with the LoRA adapter in `adapter_dir` (peft, not merged, eval mode)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    adapter_files(adapter_dir)  # a one-line error for a directory that is not an adapter
    try:
        with warnings.catch_warnings():  # peft calls transformers APIs that 5.x deprecates: not the user's concern
            warnings.filterwarnings("ignore", category=FutureWarning)
            wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError, OSError, SafetensorError) as exc:
        # A size mismatch (another lora_rank, another base model's shapes) lands here too.
        first = brief(exc, 300)
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None)
        onto = f" onto {model_dir}" if model_dir is not None else ""
        raise VlmtuneError(f"{adapter_dir}: cannot load the adapter{onto} ({(mismatch or first)[:300]})") from None
    wrapped.eval()
    return wrapped


def base_note(adapter_dir: Path, quantization) -> str | None:
    """One line on what a QLoRA adapter (trained on a quantized base) is applied to — by prediction, the servers
    and export alike; None for other adapters on a full-precision base."""
    trained = adapter_files(adapter_dir).quantization
    if quantization is not None:
        on = f"the {quantization.label} base" + (" it trained on" if trained == quantization else "")
        return f"QLoRA: {adapter_dir} applied to {on}, not merged (quantization_bit given)"
    if trained is not None:
        return (f"QLoRA: {adapter_dir} was trained on the {trained.label} base; it is applied to the "
                f"full-precision base, not to dequantized {trained.bits}-bit weights")
    return None


def load_engine(model_name_or_path: str | None, adapter_name_or_path: str | None = None,
                image_max_pixels: int | None = None, image_min_pixels: int | None = None,
                bf16: bool = False, fp16: bool = False, attn_implementation: str = "auto",
                device: str | torch.device | None = None, cache_dir: str | None = None,
                revision: str = "main", merge_adapter: bool = False, template: str | None = None,
                enable_thinking: bool | None = None, quantization=None, dtype: torch.dtype | None = None,
                log=print) -> Engine:
    """Load base model (+ adapter) and the processor with the adapter's pixel limits and chat template; in `dtype`
    when given (export: the export's), else `inference_dtype`'s choice.

    `model_name_or_path` may be None when the adapter records its base model. The base is the full-precision
    one, also for a QLoRA adapter, unless `quantization` (a `model.quantize.Quantization`) asks for it quantized
    — then the adapter is not merged: merging into quantized weights would round the sum again.
    """
    adapter_dir = None
    if adapter_name_or_path:
        adapter_dir = Path(adapter_name_or_path).expanduser()
        adapter_files(adapter_dir)  # fail on a bad adapter before the (slow) model load
        if not model_name_or_path:
            model_name_or_path = adapter_files(adapter_dir).base_model
            if not model_name_or_path:
                raise VlmtuneError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path; "
                                   f"pass --model_name_or_path")
    model_dir = resolve_model_dir(model_name_or_path, cache_dir, revision)
    if adapter_dir is not None:
        warn_if_other_base(adapter_dir, model_name_or_path, model_dir, lambda line: print(line, file=sys.stderr, flush=True))
    max_pixels, min_pixels = resolve_pixel_limits(adapter_dir, image_max_pixels, image_min_pixels)
    processor = load_processor(model_dir, max_pixels, min_pixels,
                               *resolve_template(adapter_dir, template, enable_thinking))
    device = pick_device(device)
    dtype = dtype if dtype is not None else inference_dtype(device, bf16, fp16)
    model = load_model(model_dir, dtype=dtype, attn_implementation=attn_implementation, device=device,
                       quantization=quantization)
    model.eval()
    if adapter_dir is not None:
        note = base_note(adapter_dir, quantization)
        if note is not None:
            log(note)
        model = attach_adapter(model, adapter_dir, model_dir)
        if merge_adapter and quantization is None:
            model.merge_adapter()
    source = "from the adapter" if adapter_dir is not None and image_max_pixels is None and \
        adapter_files(adapter_dir).max_pixels is not None else "given" if image_max_pixels is not None else "model default"
    log(f"model: {model_dir}" + (f" + adapter {adapter_dir}" if adapter_dir else "") +
        f" ({str(dtype).replace('torch.', '')}{f', language model {quantization.label}' if quantization else ''} on "
        f"{device}); image pixels {processor.min_pixels}..{processor.max_pixels}"
        f" ({source}); template {processor.template.name}")
    return Engine(model, processor, model_dir, adapter_dir, device, dtype)
