"""QLoRA: the language model's linear layers loaded quantized (bitsandbytes 4-bit nf4/fp4 or 8-bit), LoRA on top.

What is quantized, and what is not: bitsandbytes replaces the `nn.Linear` layers it is allowed to; the family's
vision tower, projector and lm_head are kept out of it (`skip_modules`, from the family's `Layout`), and the
embeddings, norms and MoE expert tensors are not linear layers, so they stay in the compute dtype too. LoRA's
weights are fp32 (`model.adapters.apply_finetuning` upcasts every trainable tensor).

peft's `prepare_model_for_kbit_training` is deliberately not called: it upcasts every non-quantized tensor to fp32
(the vision tower, the embeddings and lm_head — several GB on a 9B model, the memory QLoRA is for) and turns
gradient checkpointing on by its own rules; the base is frozen by peft anyway, and checkpointing (with the
inputs' gradients it needs) is the training loop's, as for plain LoRA.

The adapter is an ordinary peft adapter: it applies to the full-precision base as well. Training records how the
base was quantized next to it (`vlmtune_quantization.json`, the run's own keys), so that prediction, the servers
and export can say what they apply it to — by default the full-precision base; prediction on the quantized base
when `quantization_bit` is given to it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmtune.errors import VlmtuneError, brief
from vlmtune.files import read_json_object, write_atomic

RECORD = "vlmtune_quantization.json"
EXTRA = "pip install 'vlmtune[qlora]'"


@dataclass(frozen=True)
class Quantization:
    """How the base is loaded: `bits` 4 (with a data type and double quantization) or 8."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True

    @property
    def label(self) -> str:
        """For messages: "4-bit nf4 (double quantization)", "8-bit"."""
        if self.bits == 8:
            return "8-bit"
        return f"4-bit {self.quant_type}" + (" (double quantization)" if self.double_quant else "")

    def record(self) -> dict:
        """The run's own keys (config.ModelConfig), as saved with the adapter."""
        record = {"quantization_bit": self.bits, "quantization_method": "bnb"}
        if self.bits == 4:
            record.update(quantization_type=self.quant_type, double_quantization=self.double_quant)
        return record


def quantization_of(model_cfg) -> Quantization | None:
    """The quantization a run asks for (a `config.ModelConfig`), None for none; a missing bitsandbytes is said
    here, in one line naming the extra, before any data or model is read."""
    if model_cfg.quantization_bit is None:
        return None
    require_bitsandbytes(f"quantization_bit: {model_cfg.quantization_bit}")
    if int(model_cfg.quantization_bit) == 8:  # the 4-bit data type and double quantization mean nothing here
        return Quantization(8)
    return Quantization(4, model_cfg.quantization_type, model_cfg.double_quantization)


def require_bitsandbytes(setting: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise VlmtuneError(f"{setting}: QLoRA needs bitsandbytes, which is not installed; {EXTRA}") from None
    except Exception as exc:  # noqa: BLE001 — a broken native library fails in many ways
        raise VlmtuneError(f"{setting}: bitsandbytes does not load ({brief(exc)}); reinstall it: {EXTRA}") from None


def skip_modules(layout) -> list[str]:
    """Qualified module names bitsandbytes must leave alone: the vision tower, the projector and lm_head (a
    `families.Layout`). transformers matches them as prefixes at a module boundary."""
    return list(dict.fromkeys((layout.vision_tower, layout.projector, layout.lm_head)))


def bnb_config(quantization: Quantization, compute_dtype: torch.dtype, layout):
    """transformers' BitsAndBytesConfig for the language model of a model of this layout."""
    from transformers import BitsAndBytesConfig

    skip = skip_modules(layout)
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
                              bnb_4bit_use_double_quant=quantization.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)


def guard_cpu_packing(model) -> int:
    """bitsandbytes 0.50's CPU inference path (taken in eval mode without gradients, on CPUs with AVX512-BF16)
    repacks a 4-bit weight in blocks of 32 output rows and fails on a layer with another number of outputs
    (Qwen3.5's `in_proj_a` / `in_proj_b`: one per value head). Such layers keep the general path. Returns how
    many were kept off it."""
    from bitsandbytes.nn import Linear4bit

    kept = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and module.out_features % 32 and \
                getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            kept += 1
    return kept


def quantization_of_model(model) -> Quantization | None:
    """How a loaded model (transformers or peft-wrapped) was quantized by bitsandbytes; None when it was not."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    values = config if isinstance(config, dict) else config.to_dict()
    if values.get("load_in_4bit"):
        return Quantization(4, str(values.get("bnb_4bit_quant_type", "nf4")),
                            bool(values.get("bnb_4bit_use_double_quant", False)))
    if values.get("load_in_8bit"):
        return Quantization(8)
    return None


def save_record(model, directory: str | Path) -> None:
    """Next to an adapter saved from `model`: how its base was quantized (nothing for a full-precision base)."""
    quantization = quantization_of_model(model)
    if quantization is not None:
        write_atomic(Path(directory) / RECORD, json.dumps(quantization.record()) + "\n")


def read_record(adapter_dir: str | Path) -> Quantization | None:
    """How the base of an adapter was quantized in training; None when it was not (no record)."""
    path = Path(adapter_dir) / RECORD
    if not path.is_file():
        return None
    record = read_json_object(path)
    bits = record.get("quantization_bit")
    if bits not in (4, 8) or isinstance(bits, bool):
        raise VlmtuneError(f"{path}: not a quantization record (quantization_bit must be 4 or 8, got {bits!r})")
    if bits == 8:
        return Quantization(8)
    return Quantization(4, str(record.get("quantization_type", "nf4")), bool(record.get("double_quantization", True)))
