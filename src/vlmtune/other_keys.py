"""Keys of LLaMA-Factory's and transformers' training arguments that are not vlmtune settings.

A LLaMA-Factory YAML runs unchanged, so every key its SFT examples use is accepted (`tests/test_other_keys.py`
walks copies of them). A key here is not a setting of vlmtune (those are the typed fields of `config.py`); it is
one of two kinds:

- ``INERT``: accepted; when set (any value but an empty or false one) the start-up prints one line saying why it has
  no effect in vlmtune (a video setting on an image-only tool, a preference-training key in an sft run, ...).
- ``REFUSED``: a method or stage vlmtune deliberately does not have (GaLore, BAdam, APOLLO, LLaMA Pro, OFT, ...):
  when set, the config is refused with one line saying so and what to use instead; when false or empty it is
  accepted in silence, as LLaMA-Factory's own defaults are.

Any other field of transformers' ``Seq2SeqTrainingArguments`` (LLaMA-Factory passes them through) is inert too,
with the reason that vlmtune's loop does not read it. A key that is none of these is a typo: ``config.py`` refuses it
with the closest known key.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any

_IMAGES_ONLY = "vlmtune reads images only (no video or audio)"
_OTHER_STAGE = "a setting of LLaMA-Factory's preference and reward stages (dpo, kto, ppo, rm); sft does not use it"
_NOT_SFT_EXTRA = "a setting of a method vlmtune does not have (its switch is refused when on)"
_LAUNCHER = "vlmtune launches its processes with torchrun (one per GPU; `torchrun --nnodes ...` for clusters)"
_SWANLAB = "set SwanLab's environment variables (SWANLAB_PROJ_NAME, SWANLAB_WORKSPACE, SWANLAB_MODE, ...) instead"
_USE_LORA = "train with finetuning_type: lora (or QLoRA with quantization_bit), freeze or full"

# key -> why it has no effect here
INERT: dict[str, str] = {
    # model
    "adapter_folder": "KTransformers adapters are not supported",
    "low_cpu_mem_usage": "transformers 5 always loads weights without a second copy",
    "use_unsloth": "vlmtune runs transformers' modelling code with its own proven fast paths, not Unsloth's",
    "use_unsloth_gc": "vlmtune uses torch's non-reentrant checkpointing (see gradient_checkpointing)",
    "enable_liger_kernel": "vlmtune computes logits only at the answer positions, the memory Liger's fused "
                           "cross-entropy saves; its other kernels are not used",
    "use_v1_kernels": "vlmtune uses the model family's GPU kernels (flash-attn, flash-linear-attention) when "
                      "installed, and says so at start-up when they are missing",
    "moe_aux_loss_coef": "the router's load-balancing loss is not added (LoRA on attention leaves the routers "
                         "untouched)",
    "upcast_layernorm": "Qwen's RMS norms compute in fp32 inside transformers' modules already",
    "upcast_lmhead_output": "the logits at the answer positions are upcast to fp32 before the loss already",
    "offload_folder": "weights are not offloaded to disk",
    "use_kv_cache": "generation and label scoring always use the KV cache",
    "infer_dtype": "prediction computes in the dtype that bf16 / fp16 select",
    "hf_hub_token": "set HF_TOKEN in the environment (huggingface_hub reads it)",
    "ms_hub_token": "set MODELSCOPE_API_TOKEN in the environment",
    "om_hub_token": "Modelers hub is not supported",
    "print_param_status": "the log prints the trainable-parameter summary; `vlmtune inspect` prints it without "
                          "training",
    "quantization_device_map": "the quantized model is placed on this rank's device",
    "image_do_pan_and_scan": "an option of Gemma 3's processor; Qwen's smart resize is used",
    "crop_to_patches": "an option of InternVL's processor; Qwen's smart resize is used",
    "video_fps": _IMAGES_ONLY,
    "video_maxlen": _IMAGES_ONLY,
    "use_audio_in_video": _IMAGES_ONLY,
    "audio_sampling_rate": _IMAGES_ONLY,
    "export_hub_model_id": "export writes export_dir only; upload it with `hf upload`",
    "export_quantization_nsamples": "GPTQ export is not supported",
    "export_quantization_maxlen": "GPTQ export is not supported",
    "vllm_maxlen": "give vLLM's settings in vllm_config ({max_model_len: ...}); the default fits the data",
    "vllm_gpu_util": "give vLLM's settings in vllm_config ({gpu_memory_utilization: ...})",
    "vllm_enforce_eager": "give vLLM's settings in vllm_config ({enforce_eager: true})",
    "vllm_max_lora_rank": "vLLM's max_lora_rank is set from the adapter's rank",
    "sglang_maxlen": "SGLang is not a vlmtune backend", "sglang_mem_fraction": "SGLang is not a vlmtune backend",
    "sglang_tp_size": "SGLang is not a vlmtune backend", "sglang_config": "SGLang is not a vlmtune backend",
    "sglang_lora_backend": "SGLang is not a vlmtune backend",
    # data
    "streaming": "the encoded-data store reads samples from disk: memory stays flat in the dataset size",
    "buffer_size": "the encoded-data store reads samples from disk: memory stays flat in the dataset size",
    "interleave_probs": "datasets are concatenated (mix_strategy: concat)",
    "preprocessing_batch_size": "records are encoded one by one into the store",
    "eval_num_beams": "evaluation scores the labels (no beam search)",
    "ignore_pad_token_for_loss": "padding never counts in the loss",
    "eval_on_each_dataset": "the eval_dataset's datasets are evaluated together",
    "tool_format": "tool calls are not part of vlmtune's tasks",
    "preserve_thinking": "earlier assistant turns render as the checkpoint's own chat template renders them",
    "tokenized_path": "the encoded-data store under $VLMTUNE_CACHE is reused by every run on the same data and "
                      "settings",
    "data_shared_file_system": "each node builds or reuses its own encoded-data store",
    # finetuning
    "module_dropout": _NOT_SFT_EXTRA, "oft_rank": _NOT_SFT_EXTRA, "oft_block_size": _NOT_SFT_EXTRA,
    "oft_target": _NOT_SFT_EXTRA,
    "galore_target": _NOT_SFT_EXTRA, "galore_rank": _NOT_SFT_EXTRA, "galore_update_interval": _NOT_SFT_EXTRA,
    "galore_scale": _NOT_SFT_EXTRA, "galore_proj_type": _NOT_SFT_EXTRA, "galore_layerwise": _NOT_SFT_EXTRA,
    "apollo_target": _NOT_SFT_EXTRA, "apollo_rank": _NOT_SFT_EXTRA, "apollo_update_interval": _NOT_SFT_EXTRA,
    "apollo_scale": _NOT_SFT_EXTRA, "apollo_proj": _NOT_SFT_EXTRA, "apollo_proj_type": _NOT_SFT_EXTRA,
    "apollo_scale_type": _NOT_SFT_EXTRA, "apollo_layerwise": _NOT_SFT_EXTRA, "apollo_scale_front": _NOT_SFT_EXTRA,
    "badam_mode": _NOT_SFT_EXTRA, "badam_start_block": _NOT_SFT_EXTRA, "badam_switch_mode": _NOT_SFT_EXTRA,
    "badam_switch_interval": _NOT_SFT_EXTRA, "badam_update_ratio": _NOT_SFT_EXTRA, "badam_mask_mode": _NOT_SFT_EXTRA,
    "badam_verbose": _NOT_SFT_EXTRA, "asft_alpha": _NOT_SFT_EXTRA, "eaft_alpha": _NOT_SFT_EXTRA,
    "pissa_iter": _NOT_SFT_EXTRA, "loraplus_lr_embedding": _NOT_SFT_EXTRA,
    "megatron_bridge_args": _NOT_SFT_EXTRA, "hyper_parallel_args": _NOT_SFT_EXTRA,
    "hyper_parallel_cp_size": _NOT_SFT_EXTRA,
    **{k: _OTHER_STAGE for k in (
        "pref_beta", "pref_ftx", "pref_bco_weight", "pref_loss", "dpo_label_smoothing", "kto_chosen_weight",
        "kto_rejected_weight", "simpo_gamma", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target",
        "ppo_whiten_rewards", "ref_model", "ref_model_adapters", "ref_model_quantization_bit", "reward_model",
        "reward_model_adapters", "reward_model_quantization_bit", "reward_model_type", "ld_alpha")},
    **{k: _SWANLAB for k in (
        "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode", "swanlab_api_key",
        "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret")},
    "pure_bf16": "trainable weights stay fp32 under bf16 autocast (the optimizer's updates are not rounded away)",
    "compute_accuracy": "evaluation always reports accuracy, precision, recall and F1 of the label answers",
    "include_effective_tokens_per_second": "the log always has tokens_per_second",
    "kt_cpu_activation": "KTransformers is not supported", "kt_weight_path": "KTransformers is not supported",
    "kt_non_expert_weight_path": "KTransformers is not supported",
    "kt_expert_checkpoint_path": "KTransformers is not supported",
    "kt_use_lora_experts": "KTransformers is not supported", "kt_lora_expert_num": "KTransformers is not supported",
    "kt_lora_expert_intermediate_size": "KTransformers is not supported",
    # LLaMA-Factory's training arguments
    "ray_num_workers": _LAUNCHER, "ray_init_kwargs": _LAUNCHER, "ray_run_name": _LAUNCHER,
    "ray_storage_path": _LAUNCHER, "ray_storage_filesystem": _LAUNCHER, "resources_per_worker": _LAUNCHER,
    "placement_strategy": _LAUNCHER,
    "master_addr": "give torchrun --master_addr", "master_port": "give torchrun --master_port",
    "enable_torch_profiler": "the torch profiler is not wired in", "profiler_output_dir": "not profiled",
    "profiler_wait_steps": "not profiled", "profiler_warmup_steps": "not profiled",
    "profiler_active_steps": "not profiled", "profiler_repeat": "not profiled",
    "profiler_record_shapes": "not profiled", "profiler_profile_memory": "not profiled",
    "profiler_with_stack": "not profiled", "profile_modules": "not profiled",
    "fp8_backend": "fp8 training is not supported", "fp8_enable_fsdp_float8_all_gather": "fp8 training is not supported",
    # transformers' FSDP options (fsdp itself is refused)
    "fsdp_config": "FSDP is not supported (use deepspeed with ZeRO-3)",
    "fsdp_transformer_layer_cls_to_wrap": "FSDP is not supported (use deepspeed with ZeRO-3)",
    "fsdp_min_num_params": "FSDP is not supported (use deepspeed with ZeRO-3)",
}

# key -> why vlmtune refuses it when it is on, and what to use instead
REFUSED: dict[str, str] = {
    "use_galore": f"GaLore is not supported: {_USE_LORA}",
    "use_apollo": f"APOLLO is not supported: {_USE_LORA}",
    "use_badam": f"BAdam is not supported: {_USE_LORA}",
    "use_llama_pro": f"LLaMA Pro (block expansion) is not supported: {_USE_LORA}",
    "use_adam_mini": "Adam-mini is not supported: vlmtune trains with AdamW (optim: adamw_torch)",
    "use_muon": "Muon is not supported: vlmtune trains with AdamW (optim: adamw_torch)",
    "mixture_of_depths": "mixture-of-depths conversion is not supported",
    "use_dft_loss": "the DFT loss is not supported: vlmtune trains with token-level cross-entropy on the answers",
    "use_asft_loss": "the ASFT loss is not supported: vlmtune trains with token-level cross-entropy on the answers",
    "use_eaft_loss": "the EAFT loss is not supported: vlmtune trains with token-level cross-entropy on the answers",
    "loraplus_lr_ratio": "LoRA+ is not supported: one learning rate for all LoRA weights (learning_rate)",
    "pissa_init": "PiSSA initialisation is not supported: LoRA starts from peft's default initialisation",
    "pissa_convert": "PiSSA is not supported",
    "create_new_adapter": "continued training trains the adapter in adapter_name_or_path; a second adapter on top is "
                          "not supported",
    "freeze_extra_modules": "use additional_target (LoRA) or freeze_trainable_modules",
    "use_mca": "Megatron-Core training is not supported: use deepspeed (ZeRO-2/3) or DDP",
    "use_megatron_bridge": "Megatron training is not supported: use deepspeed (ZeRO-2/3) or DDP",
    "use_hyper_parallel": "hyper-parallel training is not supported: use deepspeed (ZeRO-2/3) or DDP",
    "use_kt": "KTransformers is not supported",
    "fp8": "fp8 training is not supported: use bf16",
    "fsdp": "FSDP is not supported: shard with deepspeed (a ZeRO-3 JSON, e.g. examples/deepspeed/ds_z3_config.json) "
            "or train with DDP",
    "train_on_prompt": "vlmtune trains on the answers only (the loss over the prompt would teach the model to "
                       "write the rules)",
    "mask_history": "vlmtune trains every assistant answer of a multi-turn record; a record with one answer (the "
                    "judging task) trains the same either way",
    "disable_shuffling": "the data order is always shuffled by seed",
    "mix_strategy": "datasets are concatenated (mix_strategy: concat); interleaving is not supported",
    "resize_vocab": "vlmtune trains the checkpoint's own vocabulary (the labels are ordinary text)",
    "add_tokens": "vlmtune trains the checkpoint's own vocabulary (the labels are ordinary text)",
    "add_special_tokens": "vlmtune trains the checkpoint's own vocabulary (the labels are ordinary text)",
    "new_special_tokens_config": "vlmtune trains the checkpoint's own vocabulary (the labels are ordinary text)",
    "init_special_tokens": "vlmtune trains the checkpoint's own vocabulary (the labels are ordinary text)",
    "split_special_tokens": "special tokens are always kept whole",
    "rope_scaling": "RoPE scaling is not supported: the checkpoint's own position settings are used",
    "shift_attn": "LongLoRA's shifted sparse attention is not supported",
    "train_from_scratch": "training from random weights is not supported (`vlmtune tiny-model` builds test models)",
    "export_quantization_bit": "GPTQ export is not supported: export writes the merged model in full precision; "
                               "quantize it with your serving stack",
    "export_quantization_dataset": "GPTQ export is not supported",
}

# values of a REFUSED key that mean "off" besides empty and false (LLaMA-Factory's defaults)
_OFF_VALUES: dict[str, tuple[Any, ...]] = {"mix_strategy": ("concat",)}

# Stages and methods of LLaMA-Factory's `stage` and `finetuning_type` that vlmtune refuses, with the reason.
OTHER_STAGES = {
    "pt": "pre-training", "rm": "reward modelling", "ppo": "PPO", "dpo": "DPO", "kto": "KTO",
}
OTHER_METHODS = {"oft": "OFT"}


def is_set(value: Any) -> bool:
    """A key counts as set unless its value is empty, false, zero or none (LLaMA-Factory's off values)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "none", "null", "false", "no", "0", "[]")
    return value not in (None, False, 0, 0.0) and value != [] and value != {}


@lru_cache(maxsize=1)
def trainer_argument_names() -> frozenset[str]:
    """transformers' Seq2SeqTrainingArguments fields: LLaMA-Factory YAMLs may hold any of them."""
    try:
        from transformers import Seq2SeqTrainingArguments
    except ImportError:  # a command that runs without transformers; only LLaMA-Factory's own keys are known then
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(Seq2SeqTrainingArguments))


def kind_of(key: str) -> str | None:
    """'refused', 'inert' or 'trainer' (a transformers training argument); None for an unknown key."""
    if key in REFUSED:
        return "refused"
    if key in INERT:
        return "inert"
    if key in trainer_argument_names():
        return "trainer"
    return None


def refusal(key: str, value: Any) -> str | None:
    """The reason a REFUSED key with this value stops the run; None when the value turns it off."""
    if key in REFUSED and is_set(value) and value not in _OFF_VALUES.get(key, ()):
        return REFUSED[key]
    return None


def note(key: str, value: Any) -> str | None:
    """The start-up line for an accepted key that is set but has no effect; None when it is off."""
    if not is_set(value):
        return None
    if key in INERT:
        return f"{key}={value} has no effect: {INERT[key]}"
    if key in trainer_argument_names():
        return f"{key}={value} has no effect: a transformers TrainingArguments setting vlmtune's own loop does not read"
    return None
