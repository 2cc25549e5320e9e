"""What trains: LoRA on the language model (peft), selected layers (freeze), or everything (full).

`lora_target: all` means every linear layer of the *language model*. Matching the seven names by
suffix alone would also hit the vision tower's MLP (gate/up/down_proj): 23,794,688 instead of the
20,185,088 trainable parameters of Qwen2.5-VL-7B at r=8. vlmtune passes peft a regex anchored at
the language model, so the adapter is exactly the one users expect and vLLM can load it. On an MoE
(Qwen3-VL-30B-A3B) the experts are fused 3-D parameters, not linear layers, so `all` is the
attention projections, as in LLaMA-Factory; `lora_target_experts: true` adds LoRA on the experts'
parameters through peft's `target_parameters`.

The vision tower and projector are frozen by default. The projector is the tower's `merger`; Qwen3-VL's
deepstack mergers belong to the tower (LLaMA-Factory's split, `freeze_vision_tower`). With LoRA,
`freeze_vision_tower: false` puts LoRA on the tower's linear layers as well (as LLaMA-Factory's `all` does
then), so the adapter holds what trains; an unfrozen projector is trained in full and saved with it
(peft's `modules_to_save`).
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from torch import nn

from vlmtune.config import FinetuneConfig
from vlmtune.errors import VlmtuneError
from vlmtune.families import Layout, family_of_model


def model_parts(model: nn.Module) -> Layout:
    """Qualified names of the language model, vision tower, projector and lm_head (the family's layout)."""
    family = family_of_model(model)
    if family is None:
        raise VlmtuneError(f"{type(model).__name__}: not a model of a supported family")
    return family.layout


def linear_names(model: nn.Module, prefix: str, exclude: str | None = None) -> list[str]:
    """Distinct suffixes of the linear layers under `prefix` (not under `exclude`), in first-seen order."""
    found: dict[str, None] = {}  # first-seen order: q, k, v, o, gate, up, down
    for name, module in model.named_modules():
        if name.startswith(prefix + ".") and not (exclude and name.startswith(exclude + ".")) \
                and isinstance(module, nn.Linear):
            found.setdefault(name.rsplit(".", 1)[-1])
    return list(found)


def language_model_linear_names(model: nn.Module) -> list[str]:
    """Distinct suffixes of the linear layers inside the language model."""
    return linear_names(model, model_parts(model).language_model)


def lora_target_regex(model: nn.Module, lora_target: str, vision_tower: bool = False) -> tuple[str, list[str]]:
    """peft target_modules regex restricted to the language model — and, with `vision_tower`, the vision
    tower without its projector (LLaMA-Factory's `freeze_vision_tower: false` under LoRA) —, and the module
    names it targets."""
    parts = model_parts(model)
    available = language_model_linear_names(model)
    if lora_target.strip() == "all":
        names = available
    else:
        names = [n.strip() for n in lora_target.split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise VlmtuneError(f"lora_target: no linear module named {', '.join(unknown)} in the language model "
                               f"(available: {', '.join(available)})")
    regex = rf"{re.escape(parts.language_model)}\..*\.({'|'.join(names)})"
    if not vision_tower:
        return regex, names
    tower = linear_names(model, parts.vision_tower, exclude=parts.projector)
    if lora_target.strip() != "all":
        tower = [n for n in tower if n in names]
    if tower:
        # The projector (merger) is not part of the tower; a negative look-ahead keeps it out.
        regex = (rf"({regex})|({re.escape(parts.vision_tower)}\.(?!{re.escape(parts.projector.rsplit('.', 1)[-1])}\.)"
                 rf".*\.({'|'.join(tower)}))")
        names = names + [n for n in tower if n not in names]
    return regex, names


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Distinct `experts.<name>` suffixes of the language model's fused expert parameters (3-D: one matrix
    per expert), in first-seen order; empty for a dense model."""
    prefix = model_parts(model).language_model + "."
    found: dict[str, None] = {}
    for name, param in model.named_parameters():
        module_path, _, param_name = name.rpartition(".")
        if name.startswith(prefix) and param.ndim == 3 and module_path.rsplit(".", 1)[-1] == "experts":
            found.setdefault(f"experts.{param_name}")
    return list(found)


def apply_finetuning(model: nn.Module, cfg: FinetuneConfig, log=print) -> nn.Module:
    """Freeze, wrap with LoRA, or unfreeze, as the config says; trainable parameters become fp32."""
    parts = model_parts(model)
    if cfg.finetuning_type == "lora":
        model = _apply_lora(model, cfg, log)
    elif cfg.finetuning_type == "freeze":
        _apply_freeze(model, cfg, parts, log)
    else:
        log("Fine-tuning method: Full")
        for name, param in model.named_parameters():
            param.requires_grad_(_trainable_in_full(name, cfg, parts))
    # Optimiser states and updates in bf16 lose small steps; LLaMA-Factory upcasts the same way.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32 and param.device.type != "meta":
            param.data = param.data.float()
    return model


def _trainable_in_full(name: str, cfg: FinetuneConfig, parts: Layout) -> bool:
    if name.startswith(parts.projector + "."):
        return not cfg.freeze_multi_modal_projector
    if name.startswith(parts.vision_tower + "."):
        return not cfg.freeze_vision_tower
    return not cfg.freeze_language_model


def _apply_lora(model: nn.Module, cfg: FinetuneConfig, log) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    log("Fine-tuning method: LoRA")
    regex, names = lora_target_regex(model, cfg.lora_target, vision_tower=not cfg.freeze_vision_tower)
    log(f"Found linear modules: {','.join(names)}")
    parts = model_parts(model)
    modules_to_save = [m.strip() for m in (cfg.additional_target or "").split(",") if m.strip()]
    if not cfg.freeze_multi_modal_projector:
        modules_to_save.append(parts.projector.rsplit(".", 1)[-1])
    target_parameters = None
    if cfg.lora_target_experts:
        target_parameters = expert_parameter_names(model)
        if not target_parameters:
            raise VlmtuneError("lora_target_experts: the model has no expert parameters (it is not a mixture of "
                               "experts)")
        log(f"LoRA on the experts' parameters: {','.join(target_parameters)}")
    lora_config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=cfg.lora_dropout,
        target_modules=regex, modules_to_save=modules_to_save or None, use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora, task_type="CAUSAL_LM",
        **({"target_parameters": target_parameters} if target_parameters else {}),
    )
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`; the FutureWarning is
        # theirs to fix and says nothing to our user.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora_config)
    return model


def _apply_freeze(model: nn.Module, cfg: FinetuneConfig, parts: Layout, log) -> None:
    log("Fine-tuning method: Freeze")
    layers_prefix = parts.language_model + ".layers."
    n_layers = 1 + max(int(n[len(layers_prefix):].split(".")[0]) for n, _ in model.named_parameters()
                       if n.startswith(layers_prefix))
    k = cfg.freeze_trainable_layers
    chosen = range(n_layers - k, n_layers) if k > 0 else range(0, -k)
    modules = [m.strip() for m in cfg.freeze_trainable_modules.split(",")]
    for name, param in model.named_parameters():
        trainable = False
        if name.startswith(layers_prefix):
            layer = int(name[len(layers_prefix):].split(".")[0])
            trainable = layer in chosen and ("all" in modules or any(f".{m}." in name for m in modules))
        elif name.startswith(parts.projector + "."):
            trainable = not cfg.freeze_multi_modal_projector
        elif name.startswith(parts.vision_tower + "."):
            trainable = not cfg.freeze_vision_tower
        param.requires_grad_(trainable)
    log(f"Set trainable layers: {','.join(str(i) for i in chosen)} ({','.join(modules)})")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; works on meta-device models."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 partitions weights to empty tensors
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes 4-bit packs two weights per byte
        if quant_state is not None and getattr(quant_state, "shape", None) is not None:
            n = math.prod(quant_state.shape)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def parameter_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
