"""Every YAML key vlmtune accepts, as typed dataclasses whose field help is the documentation.

The user's LLaMA-Factory YAML is flat (`lora_rank: 8`, `learning_rate: 1.0e-4`, ...). We read it into
sections so code says where a setting belongs — ``cfg.model``, ``cfg.data``, ``cfg.finetune``,
``cfg.train``, ``cfg.predict``, ``cfg.export`` — while the file stays flat and unchanged. Each key lives in
exactly one section.

``load_config(path, overrides)`` reads the YAML, applies ``key=value`` overrides from the command line
(typed by the field: ``lora_rank=16`` is an int), and rejects unknown keys with the closest known key.
Keys that are accepted but have no effect in some situation (``ddp_timeout`` on one process, ...) say
so in their help (``Ignored: ...``) and :func:`inert_settings` lists them at start-up, so nothing is
silently dropped. ``docs/config.md`` is generated from these classes (``python -m vlmtune.config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmtune import other_keys
from vlmtune.data.template import TEMPLATE_NAMES, TEMPLATES, get_template
from vlmtune.errors import VlmtuneError
from vlmtune.files import read_text
from vlmtune.labels import parse_labels


def _help(text: str, default: Any = None) -> Any:
    """A dataclass field carrying its documentation (default None unless given)."""
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    """Which model to load and how its images are sized."""

    model_name_or_path: str | None = _help(
        "Local directory or hub id of the base model: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense or MoE), Qwen3.5 / 3.6 / "
        "3.8 (dense or MoE) — the README's table. A hub id is fetched from Hugging Face, or from ModelScope when the environment sets "
        "USE_MODELSCOPE_HUB=1.")
    adapter_name_or_path: str | None = _help(
        "Directory of a trained LoRA adapter to load on top of the base model (prediction, serving, export, "
        "or continued training).")
    trust_remote_code: bool = _help(
        "Passed to transformers when loading. Every supported family is built into transformers, so it is not "
        "needed.", True)
    image_max_pixels: int = _help(
        "Largest image area in pixels after resizing (Qwen's smart resize keeps the aspect ratio and rounds "
        "sides to multiples of 28 for Qwen2/2.5-VL, 32 for Qwen3-VL and Qwen3.5). Fewer pixels, fewer image tokens: "
        "262144 gives at most 334 tokens on Qwen2.5-VL, 256 on Qwen3-VL and Qwen3.5. Prediction, the servers and "
        "the sweep use the limits saved with the adapter unless given.", 768 * 768)
    image_min_pixels: int = _help("Smallest image area in pixels after resizing (as image_max_pixels: the adapter's "
                                  "unless given).", 32 * 32)
    video_max_pixels: int = _help("Largest video-frame area. Ignored: vlmtune reads images only.", 256 * 256)
    video_min_pixels: int = _help("Smallest video-frame area. Ignored: vlmtune reads images only.", 16 * 16)
    cache_dir: str | None = _help("Where downloaded hub models are stored (hub default when empty).")
    model_revision: str = _help("Hub branch, tag or commit of the model.", "main")
    attn_implementation: str = _help(
        "Attention kernel: auto (flash_attention_2 on a GPU when flash-attn is installed, else sdpa), sdpa, "
        "eager, flash_attention_2.", "auto")
    flash_attn: str | None = _help(
        "LLaMA-Factory's name for the attention choice (auto, sdpa, fa2, disabled); mapped onto "
        "attn_implementation.")
    use_fast_tokenizer: bool = _help("Use the Rust (fast) tokenizer. Always true in vlmtune.", True)
    quantization_bit: int | None = _help(
        "QLoRA: load the language model's linear layers quantized to 4 or 8 bits with bitsandbytes and train LoRA "
        "(fp32) on top; the vision tower, projector, embeddings and lm_head stay in the compute dtype. Needs "
        "finetuning_type: lora and the `qlora` extra (pip install 'vlmtune[qlora]'). The adapter is saved as any "
        "other: prediction, the servers and export apply it to the full-precision base (export never merges into "
        "dequantized weights); given to `vlmtune predict`, the base is loaded quantized instead, the adapter "
        "not merged.")
    quantization_method: str = _help(
        "Quantization library: bnb (bitsandbytes, on the fly). LLaMA-Factory's hqq and eetq, and checkpoints "
        "quantized ahead (GPTQ, AWQ, AQLM), are refused: use bnb.", "bnb")
    quantization_type: str = _help("4-bit data type of bitsandbytes: nf4 or fp4.", "nf4")
    double_quantization: bool = _help("4-bit: quantize the quantization constants too (saves ≈0.4 bit per weight).",
                                      True)


@dataclass
class DataConfig:
    """Which datasets to read, how to render them, and how to split them."""

    dataset: str | None = _help(
        "Dataset name(s) from dataset_info.json, comma separated (\"a,b\" joins both), or paths of .json/.jsonl "
        "files or folders (ms-swift's way: the layout read off the first record): the training data, or what "
        "`vlmtune predict`, `sweep`, `webui` and `data check` read.")
    eval_dataset: str | None = _help(
        "Validation dataset name(s). When set, val_size is not used.")
    dataset_dir: str = _help(
        "Directory holding dataset_info.json; dataset files and relative image paths resolve against it.", "data")
    media_dir: str | None = _help(
        "Folder that relative image paths in the datasets resolve against (LLaMA-Factory's key). Default: "
        "dataset_dir.")
    template: str | None = _help(
        "Chat template, LLaMA-Factory's names: qwen2_vl (Qwen2-VL, Qwen2.5-VL; \"You are a helpful assistant.\" "
        "when a record has no system turn), qwen3_vl_nothink (Qwen3-VL Instruct; no default system turn), qwen3_vl "
        "(Qwen3-VL's reasoning template, see enable_thinking); for Qwen3.5 / 3.6 / 3.8 qwen3_5, qwen3_6, qwen3_8 "
        "(reasoning templates rendered as the checkpoints' own chat template renders) and qwen3_5_nothink "
        "(LLaMA-Factory's rendering without any thought block, which the checkpoints' own template does not serve: "
        "a start-up line says so). A template of another family than the model's is refused. Default: the model "
        "family's — qwen3_vl for a Qwen3-VL checkpoint whose chat template thinks; qwen3_5 with enable_thinking "
        "false for Qwen3.5 / 3.6 / 3.8, the prompt their own template serves with thinking off.")
    enable_thinking: bool | None = _help(
        "Reasoning templates (qwen3_vl, qwen3_5, qwen3_6, qwen3_8) only, LLaMA-Factory's meaning: an answer without "
        "a thought block gets an empty one (<think>\\n\\n</think>\\n\\n) that is trained on (true), or that "
        "ends the prompt and is not trained on, answers' own thoughts removed (false). Prediction reads the answer "
        "after the thought. Default: true for a template named in the config (LLaMA-Factory's default); false "
        "for the default template of a Qwen3.5 checkpoint.")
    cutoff_len: int = _help(
        "Longest sample in tokens (prompt + image tokens + answer). vlmtune never cuts image tokens or the "
        "answer: a longer sample is reported by the data checks (and refused, or skipped with "
        "skip_bad_records). Prediction never truncates: a prompt longer than the model's context is refused, naming "
        "the record.", 2048)
    max_samples: int | None = _help("Use at most this many records from each dataset: the first ones (of those "
                                    "an entry's num_samples drew, when dataset_info.json sets it).")
    packing: bool = _help(
        "Padding-free training: the per_device_train_batch_size samples of each micro-batch go into one row "
        "without padding, each keeping its own positions (its own 3-D rope positions), and no sample attends to "
        "another — sdpa with a block-diagonal causal mask, flash_attention_2 with its variable-length kernel. "
        "Loss and gradients are those of the padded micro-batch; what is saved is the padding's compute. Unlike "
        "LLaMA-Factory's packing (samples packed up to cutoff_len, attending to each other unless neat_packing), "
        "samples never see each other here, and rows hold one micro-batch. Qwen3.5 / 3.6 / 3.8 (linear-attention "
        "layers) need a CUDA device with flash-linear-attention and causal-conv1d (pip install 'vlmtune[gdn]'); "
        "elsewhere the run is refused at start-up.", False)
    neat_packing: bool = _help(
        "LLaMA-Factory's packing without attention across samples: here the same as packing (which never lets "
        "samples attend to each other).", False)
    val_size: float = _help(
        "Fraction (< 1) or count (≥ 1) of the training data held out for validation, stratified by the final "
        "assistant answer and seeded by `seed`.", 0.0)
    overwrite_cache: bool = _help(
        "Rebuild the encoded-data store instead of reusing it (LLaMA-Factory's meaning). The store — token ids, "
        "labels and resized images of every record, on disk under $VLMTUNE_CACHE (default ~/.cache/vlmtune) — is "
        "otherwise reused by every run on the same records, images, template, tokenizer, image settings and "
        "cutoff_len, and rebuilt when any of them changes.", False)
    preprocessing_num_workers: int | None = _help(
        "Threads each rank encodes the dataset with (the node's ranks split the records between them). Capped "
        "at the CPU cores left after torch's threads, since oversubscribing cores slows everything down.")
    skip_bad_records: bool = _help(
        "Train without the records that fail the data checks (they are counted and reported) instead of "
        "refusing to start.", False)
    labels: list[str] | None = _help(
        "The closed set of answers (e.g. [满足要求, 不满足要求]) for label scoring and task metrics. When "
        "empty, it is inferred when the dataset's answers form a small set (≤ 8 distinct answers). In training, "
        "an answer that is none of them is refused at start-up, naming its record. On a command line: a,b.")
    positive_label: str = _help("The positive class for precision / recall / F1.", "满足要求")
    default_system: str | None = _help(
        "System prompt used for records without one (Qwen's template default: \"You are a helpful "
        "assistant.\").")


@dataclass
class FinetuneConfig:
    """What is trained: LoRA, selected layers, or everything."""

    stage: str = _help("Training stage. Only sft (supervised fine-tuning) is supported.", "sft")
    finetuning_type: str = _help("lora, freeze (train selected layers) or full.", "lora")
    lora_rank: int = _help("LoRA rank r.", 8)
    lora_alpha: int | None = _help("LoRA scaling alpha; default 2 × lora_rank.")
    lora_dropout: float = _help("Dropout on the LoRA path.", 0.0)
    lora_target: str = _help(
        "Modules that get LoRA: `all` = every linear layer of the language model (not the vision tower, "
        "projector or lm_head), or a comma list of module names (q_proj,v_proj).", "all")
    lora_target_experts: bool = _help(
        "Mixture-of-experts models (Qwen3-VL-30B-A3B): also put LoRA on the experts' fused parameters "
        "(gate_up_proj, down_proj of every expert, through peft's target_parameters). Off by default, as in "
        "LLaMA-Factory, where lora_target: all on an MoE is the attention projections only.", False)
    additional_target: str | None = _help(
        "Comma list of extra modules trained in full next to LoRA (e.g. lm_head, embed_tokens).")
    use_rslora: bool = _help("Rank-stabilised LoRA scaling (alpha / sqrt(r)).", False)
    use_dora: bool = _help("Weight-decomposed LoRA (DoRA).", False)
    freeze_vision_tower: bool = _help(
        "Keep the vision encoder frozen. false: with LoRA, LoRA on the vision tower's linear layers too (as "
        "LLaMA-Factory's lora_target: all then; saved in the adapter; vLLM applies it only with "
        "enable_tower_connector_lora); with full/freeze fine-tuning, the tower trains in full.", True)
    freeze_multi_modal_projector: bool = _help("Keep the vision-to-language projector (merger) frozen.", True)
    freeze_language_model: bool = _help("Keep the language model frozen (full/freeze fine-tuning only).", False)
    freeze_trainable_layers: int = _help(
        "freeze fine-tuning: train the last n language-model layers (negative: the first n).", 2)
    freeze_trainable_modules: str = _help(
        "freeze fine-tuning: which parts of those layers train (`all`, or names like mlp,self_attn).", "all")
    plot_loss: bool = _help("Write training_loss.png and training_eval_*.png into output_dir.", False)


@dataclass
class TrainConfig:
    """How training runs: optimisation, evaluation, checkpoints, logging, hardware."""

    output_dir: str = _help(
        "Where adapters, checkpoints, logs and plots are written. A training run holds a lock on it (the file "
        ".vlmtune.lock, released when the run's process ends, however it ends): a second `vlmtune train` into it "
        "meanwhile is refused, naming the first one's pid.", "output")
    do_train: bool | None = _help(
        "Train. Default: true, unless do_predict is true — LLaMA-Factory's predict YAML sets no do_train and "
        "only predicts. false without do_predict still trains (a start-up line says so).")
    do_eval: bool = _help("Evaluate at the end of training when a validation split exists.", True)
    do_predict: bool = _help(
        "After training (or alone: do_train unset or false), predict eval_dataset with the trained adapter (else "
        "adapter_name_or_path) into output_dir/generated_predictions.jsonl: LLaMA-Factory's prompt, predict and "
        "label per line, plus vlmtune's id, images and, when scoring, scores. The predict-section keys apply.",
        False)
    overwrite_output_dir: bool = _help(
        "Allow writing into a non-empty output_dir. The earlier run's checkpoint-N directories are then removed "
        "when training starts (the log lists them), so a later resume cannot pick one of them up. Without it, a "
        "non-empty output_dir is refused unless the run resumes.", False)
    per_device_train_batch_size: int = _help(
        "Samples per device per micro-batch; at most the training records ÷ the ranks (more is refused at "
        "start-up: every micro-batch would repeat records).", 1)
    per_device_eval_batch_size: int = _help("Samples per device per evaluation batch.", 1)
    gradient_accumulation_steps: int = _help("Micro-batches per optimisation step.", 1)
    learning_rate: float = _help("Peak learning rate of AdamW.", 5e-5)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    adam_beta1: float = _help("AdamW beta1.", 0.9)
    adam_beta2: float = _help("AdamW beta2.", 0.999)
    adam_epsilon: float = _help("AdamW epsilon.", 1e-8)
    max_grad_norm: float = _help("Clip the gradient norm to this (0 disables clipping).", 1.0)
    num_train_epochs: float = _help("Epochs to train (fractions allowed).", 3.0)
    max_steps: int = _help("Total optimisation steps; overrides num_train_epochs when > 0.", -1)
    lr_scheduler_type: str = _help(
        "Learning-rate schedule from transformers: cosine, linear, constant, constant_with_warmup, "
        "cosine_with_restarts, polynomial.", "linear")
    warmup_ratio: float = _help("Fraction of the optimisation steps spent warming up.", 0.0)
    warmup_steps: int = _help("Warm-up steps; overrides warmup_ratio when > 0.", 0)
    bf16: bool = _help("Train in bfloat16 mixed precision (trainable parameters stay fp32).", False)
    fp16: bool = _help("Train in float16 mixed precision with loss scaling (GPU only).", False)
    gradient_checkpointing: bool | None = _help(
        "Recompute each decoder layer's activations in the backward pass instead of keeping them: much less memory, "
        "about a third more compute. On unless set to false or disable_gradient_checkpointing is true — "
        "LLaMA-Factory's default, so a YAML that fits there fits here.")
    disable_gradient_checkpointing: bool = _help("LLaMA-Factory's switch: true turns gradient checkpointing off.",
                                                 False)
    use_reentrant_gc: bool | None = _help(
        "Checkpointing flavour: false (the default here) is torch's non-reentrant checkpoint, which works with "
        "frozen inputs, DDP and ZeRO-3; true is the older reentrant one (LLaMA-Factory's default).")
    gradient_checkpointing_kwargs: dict | None = _help(
        "transformers' form of the same choice: {use_reentrant: true|false}.")
    seed: int = _help("Seed for the split, data order, initialisation and dropout; in prediction, of sampling.", 42)
    logging_steps: int = _help("Log loss, lr, grad norm, throughput and memory every n steps.", 10)
    eval_strategy: str = _help("When to evaluate: no, steps (every eval_steps) or epoch.", "no")
    evaluation_strategy: str | None = _help("Older name of eval_strategy.")
    eval_steps: int | None = _help("Evaluate every n optimisation steps (default: logging_steps).")
    save_strategy: str = _help("When to write checkpoint-N: no, steps (every save_steps) or epoch.", "steps")
    save_steps: int = _help("Write checkpoint-N every n optimisation steps.", 500)
    save_total_limit: int | None = _help(
        "Keep at most this many checkpoint-N directories (the oldest go first; the best one is kept).")
    save_only_model: bool = _help(
        "Checkpoints hold only the adapter/model, not optimizer, scheduler and RNG state (cannot resume).",
        False)
    resume_from_checkpoint: str | bool | None = _help(
        "Continue a run: a checkpoint directory, or true for the latest complete checkpoint in output_dir. A "
        "checkpoint that does not fit this run is refused with the reason: a step beyond its schedule, another "
        "batch size, gradient accumulation, world size, number of examples, seed or adapter (lora_rank, "
        "lora_target), other data (any record's messages or image paths and sizes, wherever the dataset now "
        "lies), or damaged files.")
    report_to: str | list[str] = _help(
        "Where metrics go besides trainer_log.jsonl, through accelerate's trackers: tensorboard, wandb, mlflow, "
        "swanlab, all (every installed one) or none; a comma list or YAML list. Each but TensorBoard is an extra "
        "(pip install 'vlmtune[wandb]', [mlflow], [swanlab]) configured by its own environment variables "
        "(WANDB_MODE=offline, WANDB_PROJECT, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, ...). MLflow with no "
        "MLFLOW_TRACKING_URI records into MLflow's default, mlflow.db (SQLite) in the working directory, shared by "
        "the runs started there; a start-up line names the store and the run.", "none")
    logging_dir: str | None = _help("Tracker files (TensorBoard events) go here, under the run's name (default: "
                                    "output_dir/runs).")
    run_name: str | None = _help("The run's name in the trackers (default: output_dir's name).")
    metric_for_best_model: str | None = _help(
        "Metric that picks the best checkpoint: f1, accuracy, precision, recall, auc or eval_loss (default f1 "
        "when the answers form a closed label set, else eval_loss). A metric of label scoring needs a closed "
        "label set and, except accuracy, a validation split that holds more than one label: otherwise the run "
        "is refused at start-up.")
    greater_is_better: bool | None = _help("Direction of metric_for_best_model (default: false for losses).")
    load_best_model_at_end: bool = _help(
        "Make the final adapter in output_dir the best one by metric_for_best_model. Needs a validation split "
        "(val_size or eval_dataset) and eval_strategy steps or epoch; refused at start-up without them.", False)
    early_stopping_patience: int | None = _help(
        "Stop after this many evaluations without improvement of metric_for_best_model. Needs a validation split "
        "and eval_strategy steps or epoch; refused at start-up without them.")
    early_stopping_steps: int | None = _help("LLaMA-Factory's name for early_stopping_patience.")
    use_swanlab: bool = _help("LLaMA-Factory's switch for report_to: swanlab.", False)
    dataloader_num_workers: int = _help(
        "Worker processes that read batches (encoded samples, cached image features) from disk ahead of the "
        "GPU. On a CPU the cores already run torch's threads: batches are read in the training process.", 0)
    cache_image_features: bool = _help(
        "When the vision tower and projector are frozen, compute each image's features once and reuse them "
        "every epoch, from files in output_dir/.image-features (removed at the end). Faster from the second "
        "epoch on; disk per image is image tokens × hidden size (2.4 MB per 262,144-pixel image on a 7B model "
        "in bf16); memory does not grow with it.", True)
    ddp_timeout: int = _help(
        "Seconds a rank waits for the others in collective operations. Ignored: with one process there is "
        "no process group.", 1800)
    ddp_find_unused_parameters: bool | None = _help("Passed to DistributedDataParallel.")
    deepspeed: str | None = _help(
        "DeepSpeed JSON config (ZeRO-2/3), handed to accelerate's DeepSpeedPlugin; its \"auto\" values are "
        "filled from this config (batch size, gradient accumulation, max_grad_norm, bf16/fp16). Needs CUDA and "
        "the `deepspeed` extra (pip install 'vlmtune[deepspeed]'). LoRA on a 7B model fits one GPU per rank "
        "with plain DDP; ZeRO helps full fine-tuning.")
    optim: str = _help("Optimizer. adamw_torch is the one supported (adamw_torch_fused on GPU is the same).",
                       "adamw_torch")
    disable_tqdm: bool = _help(
        "Hide the progress bar. It is drawn only where stderr is a terminal; elsewhere (a log file, CI, nohup) "
        "and with this set, each logging step's line carries the progress (percentage, elapsed, remaining).", False)
    logging_first_step: bool = _help("Also log the first optimisation step.", False)
    remove_unused_columns: bool = _help("Accepted for LLaMA-Factory YAMLs. Ignored: vlmtune keeps what it needs.",
                                        False)


@dataclass
class PredictConfig:
    """How prediction answers (`vlmtune predict`, `vlmtune train` with do_predict): LLaMA-Factory's generating keys."""

    infer_backend: str = _help(
        "Prediction engine: huggingface (transformers; CPU or GPU; `transformers` is the same) or vllm (GPU, the "
        "`vllm` extra).", "huggingface")
    predict_with_generate: bool = _help(
        "true: generate each answer as text. false (LLaMA-Factory's default): score the labels — P(label) for "
        "every label, the most probable one the answer — when labels are given or the answers form a closed label "
        "set; generate otherwise. A start-up line says which and why.", False)
    max_new_tokens: int = _help(
        "Generation: most new tokens per answer (LLaMA-Factory's default is 1024; answers here are labels).", 64)
    do_sample: bool | None = _help(
        "Generation: true samples (with temperature, top_p, top_k; seeded by `seed`), false decodes greedily. "
        "Default: sample when temperature > 0.")
    temperature: float | None = _help(
        "Generation: 0 is greedy; > 0 samples. Default 0 — LLaMA-Factory's 0.95 when do_sample is true.")
    top_p: float = _help("Sampling: keep the most probable tokens whose probabilities add up to top_p (1 = all).",
                         1.0)
    top_k: int = _help("Sampling: keep the k most probable tokens (0 = all).", 0)
    repetition_penalty: float = _help("Generation: penalty on tokens already in the text (1 = none).", 1.0)
    num_beams: int = _help("Beam search width. Only 1 (no beam search): larger has no effect (a start-up line).", 1)
    length_penalty: float = _help("Beam search's length penalty. No effect: no beam search.", 1.0)
    max_length: int | None = _help(
        "Longest prompt + answer. No effect: max_new_tokens bounds the answer (LLaMA-Factory drops max_length too "
        "when max_new_tokens is set).")
    skip_special_tokens: bool = _help(
        "Decode answers without special tokens. Always true: an answer is compared with its label as text.", True)

    def sampling_temperature(self) -> float:
        """The temperature generation uses: 0 (greedy) when do_sample is false."""
        return 0.0 if self.do_sample is False else float(self.temperature or 0.0)


@dataclass
class ExportConfig:
    """`vlmtune export`: LLaMA-Factory's export (merge_lora) keys."""

    export_dir: str | None = _help("Where the merged model is written (an empty or new directory).")
    export_size: int = _help("Largest weight file (shard) of the merged model, in GB.", 5)
    export_device: str = _help("Where the merge runs: cpu, cuda, or auto (cuda when there is a GPU).", "cpu")
    export_legacy_format: bool = _help(
        "Write the weights as PyTorch .bin files (pytorch_model*.bin) instead of .safetensors.", False)
    export_dtype: str = _help(
        "dtype of the merged weights: auto (the base checkpoint's), float32, bfloat16 or float16.", "auto")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "finetune": FinetuneConfig,
    "train": TrainConfig,
    "predict": PredictConfig,
    "export": ExportConfig,
}


@dataclass
class Config:
    """The whole run configuration: one flat YAML, six sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source: str | None = None  # the YAML file it came from, for messages
    other: dict[str, Any] = field(default_factory=dict)  # accepted keys that are not settings: `other_keys.py`

    def to_flat_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for section in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat


def key_sections() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every accepted key → (section name, field)."""
    keys: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in keys, f"key {f.name} defined twice"
            keys[f.name] = (section, f)
    return keys


_TYPE_HINTS: dict[type, dict[str, Any]] = {}


def _field_type(cls: type, name: str) -> Any:
    if cls not in _TYPE_HINTS:
        _TYPE_HINTS[cls] = typing.get_type_hints(cls)
    return _TYPE_HINTS[cls][name]


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    """Convert a YAML (or command-line) value to the field's type, or raise a clear error."""
    args = typing.get_args(hint)
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if is_union:
        if value is None and type(None) in args:
            return None
        errors = []
        # Try the non-None members in order (e.g. `str | bool` keeps true as a bool).
        members = [a for a in args if a is not type(None)]
        if isinstance(value, bool) and bool in members:
            return value
        for member in members:
            try:
                return _coerce(value, member, key, origin)
            except VlmtuneError as exc:
                errors.append(str(exc))
        raise VlmtuneError(errors[0])
    if typing.get_origin(hint) is list:
        (item_type,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise VlmtuneError(f"{origin}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_type, key, origin) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise VlmtuneError(f"{origin}: '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise VlmtuneError(f"{origin}: '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise VlmtuneError(f"{origin}: '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise VlmtuneError(f"{origin}: '{key}' must be a number, got {value!r}")
    if hint is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise VlmtuneError(f"{origin}: '{key}' must be a mapping such as {{use_reentrant: false}}, got {value!r}")
        return value
    if hint is str:
        if value is None:  # `output_dir: null` (or `output_dir=`) would otherwise be the text "None": ./None
            raise VlmtuneError(f"{origin}: '{key}' needs a value, got null (leave the key out for its default)")
        if isinstance(value, (dict, list)):
            raise VlmtuneError(f"{origin}: '{key}' must be a string, got {value!r}")
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` (eval_strategy: no) as false, `yes` as true
            return "no" if value is False else "yes"
        return str(value)
    return value


def coerce_value(cls: type, key: str, value: Any, origin: str = "command line") -> Any:
    """`value` (from a YAML or a command line) converted to the type of field `key` of the dataclass `cls`, or a
    one-line error naming the key — the same rules for every command's settings as for the config's."""
    return _coerce(value, _field_type(cls, key), key, origin)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise VlmtuneError(f"command line: override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def build_config(values: dict[str, Any], origin: str = "config") -> Config:
    """Build a Config from a flat mapping of keys, checking names and types."""
    keys = key_sections()
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    other: dict[str, Any] = {}
    for key, value in values.items():
        if key not in keys:
            other[key] = _other_key(key, value, keys, origin)
            continue
        section, f = keys[key]
        sections[section][key] = _coerce(value, _field_type(SECTIONS[section], key), key, origin)
    cfg = Config(**{name: SECTIONS[name](**vals) for name, vals in sections.items()}, other=other)
    _apply_aliases(cfg)
    validate(cfg, origin)
    return cfg


def _other_key(key: Any, value: Any, keys: dict, origin: str) -> Any:
    """A key that is not a vlmtune setting: LLaMA-Factory's or transformers' (accepted, or refused with the
    reason, see `other_keys.py`), else a typo, refused with the closest known key."""
    kind = other_keys.kind_of(str(key))
    if kind is None:
        close = difflib.get_close_matches(str(key), keys, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise VlmtuneError(f"{origin}: unknown key '{key}'{hint}")
    reason = other_keys.refusal(key, value)
    if reason:
        raise VlmtuneError(f"{origin}: '{key}: {value}': {reason}")
    return value


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(key)
        self.key, self.first_line, self.line = key, first_line, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; a YAML config with `learning_rate` twice is
    almost always an edit that went wrong, so it is refused. (Keys merged in with `<<` may override.)"""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    break
                if first != key_node.start_mark.line + 1:
                    raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A flat YAML mapping, or a one-line error naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise VlmtuneError(f"{path}: config file not found")
    try:
        loaded = yaml.load(read_text(path), Loader=_UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass
    except _DuplicateKey as exc:
        raise VlmtuneError(f"{path}: line {exc.line}: key '{exc.key}' is already set at line {exc.first_line}; "
                           f"keep one of them") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise VlmtuneError(f"{path}: not valid YAML{at}") from None
    except RecursionError:
        raise VlmtuneError(f"{path}: not valid YAML (nested too deeply)") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise VlmtuneError(f"{path}: expected a mapping of key: value at the top level")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a flat YAML file (or nothing) and apply `key=value` overrides."""
    values: dict[str, Any] = read_yaml(path) if path is not None else {}
    for item in overrides or []:
        key, value = parse_override(item)
        values[key] = value
    cfg = build_config(values, str(path) if path is not None else "command line")
    cfg.source = str(path) if path is not None else None
    return cfg


def _apply_aliases(cfg: Config) -> None:
    """Map LLaMA-Factory's older or alternative key names onto ours."""
    if cfg.train.evaluation_strategy and cfg.train.eval_strategy == "no":
        cfg.train.eval_strategy = cfg.train.evaluation_strategy
    if cfg.model.flash_attn:
        cfg.model.attn_implementation = {
            "auto": "auto", "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager",
        }.get(cfg.model.flash_attn, cfg.model.flash_attn)
    if cfg.finetune.lora_alpha is None:
        cfg.finetune.lora_alpha = 2 * cfg.finetune.lora_rank
    if isinstance(cfg.train.report_to, str):
        cfg.train.report_to = [v.strip() for v in cfg.train.report_to.split(",") if v.strip()]
    cfg.train.report_to = [v for v in cfg.train.report_to if v not in ("none", "")]
    if cfg.train.eval_steps is None:
        cfg.train.eval_steps = cfg.train.logging_steps
    if cfg.train.early_stopping_patience is None:
        cfg.train.early_stopping_patience = cfg.train.early_stopping_steps
    if cfg.train.use_swanlab and "swanlab" not in cfg.train.report_to:
        cfg.train.report_to.append("swanlab")
    _resolve_checkpointing(cfg.train)


def _resolve_checkpointing(t: TrainConfig) -> None:
    """One answer from LLaMA-Factory's and transformers' switches: `gradient_checkpointing` (on unless a switch
    turns it off) and `use_reentrant_gc` (false unless set, from either key)."""
    if t.gradient_checkpointing is None:
        t.gradient_checkpointing = not t.disable_gradient_checkpointing
    elif t.disable_gradient_checkpointing:
        t.gradient_checkpointing = False
    reentrant = (t.gradient_checkpointing_kwargs or {}).get("use_reentrant")
    if t.use_reentrant_gc is None:
        t.use_reentrant_gc = bool(reentrant) if reentrant is not None else False


_CHOICES = {
    ("data", "template"): (None, *TEMPLATE_NAMES),
    ("finetune", "stage"): ("sft",),
    ("finetune", "finetuning_type"): ("lora", "freeze", "full"),
    ("train", "eval_strategy"): ("no", "steps", "epoch"),
    ("train", "save_strategy"): ("no", "steps", "epoch"),
    ("train", "lr_scheduler_type"): ("linear", "cosine", "constant", "constant_with_warmup",
                                     "cosine_with_restarts", "polynomial"),
    ("model", "attn_implementation"): ("auto", "sdpa", "eager", "flash_attention_2"),
    ("predict", "infer_backend"): ("huggingface", "transformers", "vllm"),
    ("export", "export_dtype"): ("auto", "float32", "bfloat16", "float16"),
    ("model", "quantization_bit"): (None, 4, 8),
    ("model", "quantization_method"): ("bnb", "bitsandbytes"),
    ("model", "quantization_type"): ("nf4", "fp4"),
}


REPORT_TO = ("tensorboard", "wandb", "mlflow", "swanlab", "all")


def validate(cfg: Config, origin: str = "config") -> None:
    """Reject values that cannot work, naming the key."""
    stage, method = cfg.finetune.stage, cfg.finetune.finetuning_type
    if stage in other_keys.OTHER_STAGES:
        raise VlmtuneError(f"{origin}: 'stage: {stage}' is not supported here: vlmtune does supervised fine-tuning "
                           f"(stage: sft) only; use LLaMA-Factory for {other_keys.OTHER_STAGES[stage]}")
    if method in other_keys.OTHER_METHODS:
        raise VlmtuneError(f"{origin}: 'finetuning_type: {method}' is not supported here: "
                           f"{other_keys.OTHER_METHODS[method]} is not a vlmtune method; use lora (or QLoRA with "
                           f"quantization_bit), freeze or full")
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise VlmtuneError(f"{origin}: '{key}' must be one of {', '.join(str(a) for a in allowed if a)}, got '{value}'")
    positive = {
        "lora_rank": cfg.finetune.lora_rank,
        "cutoff_len": cfg.data.cutoff_len,
        "per_device_train_batch_size": cfg.train.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.train.per_device_eval_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "logging_steps": cfg.train.logging_steps,
        "save_steps": cfg.train.save_steps,
        "eval_steps": cfg.train.eval_steps,
        "image_max_pixels": cfg.model.image_max_pixels,
        "image_min_pixels": cfg.model.image_min_pixels,
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise VlmtuneError(f"{origin}: '{key}' must be > 0, got {value}")
    if cfg.model.image_min_pixels > cfg.model.image_max_pixels:
        raise VlmtuneError(f"{origin}: 'image_min_pixels' ({cfg.model.image_min_pixels}) is larger than "
                           f"'image_max_pixels' ({cfg.model.image_max_pixels})")
    _check_ranges(cfg, origin)
    _resolve_predict(cfg, origin)
    if cfg.model.quantization_bit is not None and cfg.finetune.finetuning_type != "lora":
        raise VlmtuneError(f"{origin}: 'quantization_bit' trains LoRA on a quantized model (QLoRA): it needs "
                           f"finetuning_type: lora, got {cfg.finetune.finetuning_type}")
    if cfg.model.quantization_bit is not None and cfg.train.deepspeed:
        # DeepSpeed would partition bitsandbytes' packed weights (ZeRO-3) or wrap them untested (ZeRO-2).
        raise VlmtuneError(f"{origin}: 'quantization_bit' (QLoRA) does not run under DeepSpeed here; drop the "
                           f"deepspeed key: QLoRA fits one GPU per rank with plain data parallelism")
    if cfg.train.bf16 and cfg.train.fp16:
        raise VlmtuneError(f"{origin}: 'bf16' and 'fp16' cannot both be true")
    if cfg.data.max_samples is not None and cfg.data.max_samples <= 0:
        raise VlmtuneError(f"{origin}: 'max_samples' must be > 0, got {cfg.data.max_samples}")
    for report in cfg.train.report_to:
        if report not in REPORT_TO:
            raise VlmtuneError(f"{origin}: 'report_to' must be any of {', '.join(REPORT_TO)} or none, got '{report}'")
    metric = cfg.train.metric_for_best_model
    if metric is not None and metric.removeprefix("eval_") not in BEST_METRICS:
        raise VlmtuneError(f"{origin}: 'metric_for_best_model' must be one of {', '.join(BEST_METRICS)} (eval_ "
                           f"prefix allowed), got '{metric}'")
    cfg.data.labels = parse_labels(cfg.data.labels, f"{origin}: 'labels'")  # vlmtune/labels.py: the one rule


# Metrics that can pick the best checkpoint (eval_loss, or a task metric of label scoring).
BEST_METRICS = ("loss", "f1", "accuracy", "precision", "recall", "specificity", "auc", "roc_auc", "pr_auc")
# Seeds seed Python, numpy and torch (transformers' set_seed); numpy takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


def _check_ranges(cfg: Config, origin: str) -> None:
    """Numbers a run cannot work with. Written as `not (lo <= x <= hi)` so that NaN (`.nan` in YAML) fails."""
    t, f = cfg.train, cfg.finetune
    ranges = [  # (key, value, low, high, low included, high included, what the range means)
        ("learning_rate", t.learning_rate, 0, math.inf, False, False, "> 0"),
        ("weight_decay", t.weight_decay, 0, math.inf, True, False, "≥ 0"),
        ("adam_beta1", t.adam_beta1, 0, 1, True, False, "in [0, 1)"),
        ("adam_beta2", t.adam_beta2, 0, 1, True, False, "in [0, 1)"),
        ("adam_epsilon", t.adam_epsilon, 0, math.inf, False, False, "> 0"),
        ("max_grad_norm", t.max_grad_norm, 0, math.inf, True, False, "≥ 0 (0 disables clipping)"),
        ("warmup_ratio", t.warmup_ratio, 0, 1, True, True, "in [0, 1]"),
        ("warmup_steps", t.warmup_steps, 0, math.inf, True, False, "≥ 0"),
        ("lora_dropout", f.lora_dropout, 0, 1, True, False, "in [0, 1)"),
        ("lora_alpha", f.lora_alpha, 0, math.inf, False, False, "> 0"),
        ("val_size", cfg.data.val_size, 0, math.inf, True, False, "≥ 0 (a fraction < 1 or a count)"),
        ("seed", t.seed, 0, MAX_SEED, True, True, f"in [0, {MAX_SEED}]"),
        ("dataloader_num_workers", t.dataloader_num_workers, 0, math.inf, True, False, "≥ 0"),
    ]
    if t.max_steps <= 0:  # epochs decide the length only without max_steps
        ranges.append(("num_train_epochs", t.num_train_epochs, 0, math.inf, False, False,
                       "> 0 (or set max_steps)"))
    for key in ("save_total_limit", "early_stopping_patience"):
        if getattr(t, key) is not None:
            ranges.append((key, getattr(t, key), 1, math.inf, True, False, "≥ 1 when set"))
    if cfg.data.preprocessing_num_workers is not None:
        ranges.append(("preprocessing_num_workers", cfg.data.preprocessing_num_workers, 0, math.inf, True, False,
                       "≥ 0 (0: as many as the cores)"))
    for key, value, low, high, low_in, high_in, meaning in ranges:
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (above and below):
            raise VlmtuneError(f"{origin}: '{key}' must be {meaning}, got {value}")


def _resolve_predict(cfg: Config, origin: str) -> None:
    """do_train's default (true, unless the run predicts: LLaMA-Factory's do_train is false unless set), the
    temperature's (LLaMA-Factory's 0.95 when do_sample asks for sampling, else greedy) and generation settings that
    cannot work."""
    if cfg.train.do_train is None:
        cfg.train.do_train = not cfg.train.do_predict
    p = cfg.predict
    if p.temperature is None:
        p.temperature = 0.95 if p.do_sample else 0.0
    if p.do_sample and p.temperature <= 0:
        raise VlmtuneError(f"{origin}: 'do_sample: true' samples, which needs temperature > 0, got {p.temperature}")
    checks = [("max_new_tokens", p.max_new_tokens > 0, "> 0"), ("temperature", p.temperature >= 0, "≥ 0"),
              ("top_p", 0 < p.top_p <= 1, "in (0, 1]"), ("top_k", p.top_k >= 0, "≥ 0 (0: all tokens)"),
              ("repetition_penalty", p.repetition_penalty > 0, "> 0"), ("num_beams", p.num_beams >= 1, "≥ 1")]
    for key, ok, meaning in checks:
        if not ok:
            raise VlmtuneError(f"{origin}: '{key}' must be {meaning}, got {getattr(p, key)}")


def prediction_notes(p: PredictConfig, mode: str) -> list[str]:
    """Lines naming the generation settings that have no effect in this prediction, printed at start-up."""
    defaults = PredictConfig()
    notes = []
    if mode == "score":
        changed = [k for k in ("max_new_tokens", "do_sample", "top_p", "top_k", "repetition_penalty")
                   if getattr(p, k) != getattr(defaults, k)] + (["temperature"] if p.temperature else [])
        if changed:
            notes.append(f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} no effect: label scoring "
                         f"reads P(label), it does not generate")
        return notes
    if p.do_sample is False and p.temperature > 0:
        notes.append(f"temperature={p.temperature} has no effect with do_sample: false (greedy decoding)")
    if p.num_beams > 1:
        notes.append(f"num_beams={p.num_beams} has no effect: vlmtune decodes greedily or samples (no beam search)")
    if p.length_penalty != defaults.length_penalty:
        notes.append(f"length_penalty={p.length_penalty} has no effect: it applies to beam search only")
    if p.max_length is not None:
        notes.append(f"max_length={p.max_length} has no effect: max_new_tokens ({p.max_new_tokens}) bounds the answer")
    if not p.skip_special_tokens:
        notes.append("skip_special_tokens=false has no effect: answers are decoded as text, without special tokens")
    return notes


def inert_settings(cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
    """Lines naming the settings that have no effect in this run, printed at start-up."""
    notes = []
    if world_size == 1 and cfg.train.ddp_timeout != TrainConfig.ddp_timeout:
        notes.append(f"ddp_timeout={cfg.train.ddp_timeout} has no effect with one process")
    if cfg.model.video_max_pixels != ModelConfig.video_max_pixels:
        notes.append("video_max_pixels has no effect: vlmtune reads images only")
    if cfg.train.fp16 and not has_cuda:
        notes.append("fp16 on CPU is not supported by torch autocast; training runs in fp32")
    if cfg.data.preprocessing_num_workers and cfg.data.preprocessing_num_workers > 1:
        notes.append(f"preprocessing_num_workers={cfg.data.preprocessing_num_workers} is capped to the free "
                     f"CPU cores")
    if not cfg.train.do_train and not cfg.train.do_predict:
        notes.append("do_train=false has no effect without do_predict: true (then only the prediction runs)")
    m = cfg.model
    if m.quantization_bit != 4 and (m.quantization_type, m.double_quantization) != ("nf4", True):
        notes.append(f"quantization_type / double_quantization have no effect without quantization_bit: 4 "
                     f"(quantization_bit is {m.quantization_bit})")
    if cfg.export.export_dir:
        notes.append(f"export_dir={cfg.export.export_dir} has no effect in training: `vlmtune export CONFIG.yaml` "
                     f"merges the adapter")
    template = cfg.data.template
    if cfg.data.enable_thinking is False and template is not None and not get_template(template).thought_words:
        notes.append(f"enable_thinking=false has no effect with template {template} (only with a reasoning "
                     f"template: {', '.join(n for n, t in TEMPLATES.items() if t.thought_words)})")
    if template is not None and get_template(template).spec.mismatch_note:
        notes.append(get_template(template).spec.mismatch_note)
    notes += [line for key, value in cfg.other.items() if (line := other_keys.note(key, value))]
    return notes


def config_reference_markdown() -> str:
    """The YAML key reference (docs/config.md), generated from the dataclasses."""
    lines = ["# Configuration keys", "",
             "Generated by `python -m vlmtune.config` from `src/vlmtune/config.py`; every key a vlmtune "
             "YAML may hold. Keys are flat in the YAML; the sections only group them here.", ""]
    for section, cls in SECTIONS.items():
        lines += [f"## {section}: {cls.__doc__.strip()}", "", "| key | type | default | meaning |",
                  "| --- | --- | --- | --- |"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else ""
            type_name = (str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
                         .replace(" | ", " or "))
            lines.append(f"| `{f.name}` | {type_name} | `{default}` | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines + _other_keys_markdown())


def _other_keys_markdown() -> list[str]:
    """The LLaMA-Factory and transformers keys that are accepted but are not settings (`other_keys.py`)."""
    lines = ["## LLaMA-Factory keys vlmtune refuses when they are on", "",
             "Accepted when false or empty (LLaMA-Factory's defaults); on, the run stops with the reason.", "",
             "| key | reason |", "| --- | --- |"]
    lines += [f"| `{key}` | {reason} |" for key, reason in sorted(other_keys.REFUSED.items())]
    lines += ["", "## LLaMA-Factory keys without effect in vlmtune", "",
              "Accepted; when set, the start-up prints one line with the reason. Any other field of transformers' "
              "`Seq2SeqTrainingArguments` is accepted the same way (vlmtune's own loop does not read it).", "",
              "| key | reason |", "| --- | --- |"]
    lines += [f"| `{key}` | {reason} |" for key, reason in sorted(other_keys.INERT.items())]
    return lines + [""]


if __name__ == "__main__":
    print(config_reference_markdown())
