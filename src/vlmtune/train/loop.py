"""The training run, LitGPT's shape: `setup` (accelerator, data and model side by side, optimiser, schedule,
resume) → `fit` (the steps, with logging, evaluation and checkpoints) → `finish` (last evaluation, final adapter,
results). The step itself — forwards, backwards, optimiser — is `train.step.optimisation_step`, visible in `fit`.

Features and their trade-offs:
- accelerate places the model, wraps it in DDP when launched by torchrun (gloo on CPU, NCCL on GPU)
  and runs bf16/fp16 autocast; transformers supplies the schedulers, peft the LoRA layers.
- The loss of a step is normalised by its label tokens over all micro-batches and ranks (`train.step`), and is
  read from the device only on logging steps (`Window`); a non-finite one stops the run before anything is saved.
- Data order is a pure function of (seed, epoch) (batches.py); a checkpoint stores how far into the
  epoch the run got, so resuming replays no sample and skips none. A thread reads micro-batches ahead.
- `packing` / `neat_packing`: each micro-batch's samples in one row without padding (`data.packing`).
- DeepSpeed (ZeRO-2/3) when `deepspeed:` names a JSON config: accelerate's DeepSpeedPlugin, and the
  engine owns the optimiser step (`train.step.backward`).
- Start-up: the model loads in a thread while the data is checked and encoded (`Background`).
- Evaluation: eval_loss on the validation split, and — when answers form a closed label set — the
  task metrics from label scoring (accuracy, precision, recall, F1, AUC), which also pick the best
  checkpoint (metric_for_best_model) and drive early stopping.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from vlmtune.config import Config, inert_settings
from vlmtune.data.batch import Batch
from vlmtune.data.encode import Collator, EncodedSample
from vlmtune.data.packing import packing_problem
from vlmtune.data.processor import load_processor
from vlmtune.errors import VlmtuneError
from vlmtune.files import DirectoryLock, ensure_writable_dir, write_atomic
from vlmtune.model.adapters import apply_finetuning, parameter_summary
from vlmtune.model.load import compute_dtype, load_model, resolve_model_dir
from vlmtune.model.quantize import quantization_of, save_record
from vlmtune.launch import node_ranks, rank_and_world, share_cores_between_local_ranks
from vlmtune.train.batches import EpochBatches, read_ahead
from vlmtune.train.distributed import (check_every_rank_sees, decided_by_rank_zero, load_device, make_accelerator,
                                       mark_zero3_leaves, vision_every_batch, zero_stage)
from vlmtune.train.evaluation import Evaluator, record_metric, restore_best, trainable_state
from vlmtune.train.checkpoint import (WRITE_ERRORS, checkpoint_dirs, describe_write_error, latest_checkpoint,
                                      load_checkpoint, model_state_dict, read_state, remove_checkpoint,
                                      remove_stale_temporaries, rotate_checkpoints, save_checkpoint, uses_deepspeed)
from vlmtune.train.image_features import FEATURES_DIR, ImageFeatureCache, can_cache
from vlmtune.train.logs import TrainLogger, plot_curves, truncate_log
from vlmtune.train.trackers import run_config, start_trackers
from vlmtune.train.prepare import Background, data_digest, describe_example, prepare_data
from vlmtune.train.selection import best_metric_rule
from vlmtune.train.step import StepResult, optimisation_step
from vlmtune.train.state import TrainerState


def check_output_dir(cfg: Config) -> Path | None:
    """The checkpoint to resume from, if any; refuses to write into a non-empty output_dir otherwise, and an
    output_dir that cannot be written (a file in the way, a read-only file system) before any work."""
    output_dir = Path(cfg.train.output_dir)
    resume = cfg.train.resume_from_checkpoint
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        ensure_writable_dir(output_dir, "output_dir")
        found = latest_checkpoint(output_dir)
        if found is None:
            raise VlmtuneError(f"{output_dir}: resume_from_checkpoint is true but there is no complete checkpoint")
        return found
    if resume:
        path = Path(resume)
        if not path.is_dir():
            raise VlmtuneError(f"resume_from_checkpoint: {path}: no such checkpoint directory")
        ensure_writable_dir(output_dir, "output_dir")
        return path
    if output_dir.is_dir() and any(p.name != DirectoryLock.NAME for p in output_dir.iterdir()) and \
            not cfg.train.overwrite_output_dir:
        raise VlmtuneError(f"{output_dir}: output_dir is not empty; set overwrite_output_dir: true to write into it "
                           f"or resume_from_checkpoint: true to continue its run")
    ensure_writable_dir(output_dir, "output_dir")
    return None


def run_shape(cfg: Config, world: int, n_examples: int, data: str | None = None) -> dict:
    """What a checkpoint's position in the data and its weights mean: a resume must have the same. `data`: what
    it trains on (`prepare.data_digest`), recorded last."""
    f = cfg.finetune
    shape = {"per_device_train_batch_size": cfg.train.per_device_train_batch_size,
             "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps, "world_size": world,
             "num_examples": n_examples, "seed": cfg.train.seed, "finetuning_type": f.finetuning_type}
    if f.finetuning_type == "lora":
        shape.update(lora_rank=f.lora_rank, lora_target=f.lora_target, additional_target=f.additional_target)
        # QLoRA resumes on the base quantized as it trained on, plain LoRA on a full-precision one.
        quantization = quantization_of(cfg.model)
        shape.update(quantization.record() if quantization is not None else {"quantization_bit": None})
    if data is not None:
        shape["data"] = data
    return shape


def check_resume_fits(state: TrainerState, shape: dict, total_steps: int, checkpoint: Path) -> None:
    """Refuse a checkpoint of another run: past this run's schedule, or of another batch geometry, data
    size or adapter (its data position and weights would mean something else here)."""
    if state.global_step > total_steps:
        raise VlmtuneError(f"resume_from_checkpoint: {checkpoint} is at step {state.global_step}, beyond this run's "
                           f"{total_steps} optimisation steps (max_steps / num_train_epochs); it belongs to another "
                           f"run — use a new output_dir, or raise max_steps")
    for key, value in shape.items():
        if key == "data" and state.run.get(key, value) != value:
            raise VlmtuneError(f"resume_from_checkpoint: {checkpoint} was trained on other data: the records' "
                               f"answers, prompts or images differ from this run's (data digest {state.run[key]} "
                               f"there, {value} now); resume on the data it started with, or use a new output_dir")
        if key in state.run and state.run[key] != value:
            raise VlmtuneError(f"resume_from_checkpoint: {checkpoint} does not fit this run: {key} was "
                               f"{state.run[key]!r} there, {value!r} now; resume with the same settings, or use a "
                               f"new output_dir")


def remove_previous_run(output_dir: Path, log) -> None:
    """overwrite_output_dir: the earlier run's checkpoints go, so a later resume cannot pick one of them up."""
    old = checkpoint_dirs(output_dir) + [p for p in output_dir.glob("checkpoint-*") if p.is_dir()]
    old = sorted(set(old), key=lambda p: p.name)
    for path in old:
        remove_checkpoint(path)
    if old:
        log(f"overwrite_output_dir: removed {len(old)} checkpoint(s) of the earlier run in {output_dir} "
            f"({', '.join(p.name for p in old)})")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def enable_checkpointing(model: torch.nn.Module, reentrant: bool) -> None:
    """Gradient checkpointing on every layer that supports it (transformers' GradientCheckpointingLayer): a
    layer's activations are recomputed in the backward pass instead of kept, LLaMA-Factory's default."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.25 (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # The reentrant checkpoint backpropagates into a layer only when one of its inputs needs a gradient; with frozen
    # embeddings (LoRA) none would. transformers enables the embeddings' output gradients itself for a model whose
    # input is input_ids (every family here; 5.16.1 and 5.25 alike), so nothing is added for it here.
    model.config.use_cache = False  # training never reads the cache; scoring asks for it explicitly


@dataclass
class Run:
    """Everything set up for a run (`setup`), and what the loop (`fit`) keeps between steps."""

    cfg: Config
    accelerator: object
    log: Callable[[str], None]
    output_dir: Path
    processor: object
    data: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    trainable: list[torch.Tensor]
    batches: EpochBatches
    total_steps: int
    state: TrainerState
    metric_name: str
    greater_is_better: bool
    logger: TrainLogger
    evaluator: Evaluator
    feature_cache: ImageFeatureCache
    collate: Callable[[list[EncodedSample]], Batch]  # the training micro-batches' (padded, or packed)
    best_weights: dict[str, torch.Tensor] | None = None
    last_eval_step: int = -1
    stop: bool = False
    train_runtime: float = 0.0
    steps_at_start: int = 0

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def train(cfg: Config) -> dict:
    """A whole run, LitGPT's shape: set up, fit (the steps, with evaluation and checkpoints), validate and save."""
    with output_dir_lock(cfg):
        run = setup(cfg)
        fit(run)
        return finish(run)


def output_dir_lock(cfg: Config):
    """The run's hold on output_dir (`files.DirectoryLock`): a second `vlmtune train` into it is refused in one
    line naming the first's pid. Only rank 0 takes it: the ranks of one run share output_dir."""
    import contextlib

    if rank_and_world()[0] != 0:
        return contextlib.nullcontext()
    output_dir = ensure_writable_dir(cfg.train.output_dir, "output_dir")
    return DirectoryLock(output_dir, "another vlmtune train", "output_dir")


def fit(run: Run) -> None:
    """The steps until the schedule ends or early stopping says so; the step itself is `train.step`."""
    cfg, state, model = run.cfg, run.state, run.model
    progress = run.logger.start_progress(enabled=not cfg.train.disable_tqdm)
    window = Window()
    start, run.steps_at_start = time.time(), state.global_step
    model.train()
    while not run.stop and state.global_step < run.total_steps:
        for micro in micro_batches(run, state.epoch, state.micro_batches_done):
            result = optimisation_step(model, run.optimizer, run.scheduler, run.accelerator, micro, run.trainable,
                                       cfg.train.max_grad_norm, cfg.train.gradient_accumulation_steps)
            state.global_step += 1
            state.micro_batches_done += len(micro)
            state.samples_seen += result.samples * run.world
            window.add(result)
            progress.update(1)
            after_step(run, window, progress)
            if run.stop:
                break
    window.settle(run, state)
    progress.close()
    run.train_runtime = time.time() - start


def after_step(run: Run, window: Window, progress) -> None:
    """What follows a step when it is due: a log row, an evaluation (best model, early stopping), a checkpoint."""
    cfg, state = run.cfg, run.state
    step = state.global_step
    if step % cfg.train.logging_steps == 0 or (cfg.train.logging_first_step and step == 1):
        row = window.read(run, state)  # the one place the step's loss leaves the device
        progress.set_postfix(loss=f"{row['loss']:.4f}")
        run.logger.log(step, {**row, "lr": run.scheduler.get_last_lr()[0], "peak_memory_mb": peak_memory_mb(),
                              "epoch": epoch_progress(run)}, prefix="train")
    epoch_ends = state.micro_batches_done >= run.batches.micro_batches_per_epoch
    if run.evaluator.due(step, epoch_ends):
        evaluate(run)
    if epoch_ends:
        state.epoch += 1
        state.micro_batches_done = 0
    if save_due(cfg, step, epoch_ends) or (run.stop and cfg.train.save_strategy != "no"):
        window.settle(run, state)
        check_finite(run)
        save_checkpoint(run.accelerator, run.model, run.processor, run.optimizer, run.scheduler, state,
                        run.output_dir, cfg.train.save_only_model)
        if run.is_main:
            best_dir = run.output_dir / f"checkpoint-{state.best_step}" if state.best_step else None
            rotate_checkpoints(run.output_dir, cfg.train.save_total_limit, best_dir)
    if step >= run.total_steps:
        run.stop = True


class Window:
    """The steps since the last log row, their losses still on the device: read (one host sync) on logging steps,
    and added to the run's train_loss before anything is saved."""

    def __init__(self):
        self.loss_sum: torch.Tensor | float = 0.0  # since the last log row
        self.unsettled: torch.Tensor | float = 0.0  # not yet in state.train_loss_sum
        self.steps = self.samples = self.tokens = 0
        self.grad_norm = None
        self.start = time.time()

    def add(self, result: StepResult) -> None:
        self.loss_sum = self.loss_sum + result.loss
        self.unsettled = self.unsettled + result.loss
        self.steps += 1
        self.samples += result.samples
        self.tokens += result.tokens
        self.grad_norm = result.grad_norm

    def settle(self, run: Run, state: TrainerState) -> None:
        """The losses since the last settling into `state.train_loss_sum`; a non-finite one stops the run."""
        value = float(self.unsettled)
        self.unsettled = 0.0
        if not math.isfinite(value):
            raise VlmtuneError(non_finite_message(run, state.global_step))
        state.train_loss_sum += value

    def read(self, run: Run, state: TrainerState) -> dict:
        """The log row of the window, and a new window."""
        loss = float(self.loss_sum) / max(self.steps, 1)
        self.settle(run, state)
        elapsed = max(time.time() - self.start, 1e-9)
        norm = self.grad_norm
        row = {"loss": loss, "grad_norm": float("nan") if norm is None else float(norm),
               "samples_per_second": self.samples * run.world / elapsed,
               "tokens_per_second": self.tokens * run.world / elapsed}
        self.__init__()
        return row


def non_finite_message(run: Run, step: int) -> str:
    """A loss that is no number any more: the run stops before writing anything from it."""
    found = checkpoint_dirs(run.output_dir)
    kept = (f"the last checkpoint written before it, {found[-1].name}, is finite" if found
            else "no checkpoint or adapter was written")
    return (f"{run.output_dir}: the training loss became non-finite (nan/inf) by step {step}; stopped without "
            f"saving: {kept}; lower learning_rate (now {run.cfg.train.learning_rate:g}) or keep max_grad_norm > 0")


def check_finite(run: Run) -> None:
    """Before anything is written: every trainable weight a number (one look at the device, at save time only).
    Under DeepSpeed each rank holds a part of them: the loss check (`Window.settle`) stands for it there."""
    if uses_deepspeed(run.accelerator):
        return
    if not all(bool(torch.isfinite(p).all()) for p in run.trainable):
        raise VlmtuneError(non_finite_message(run, run.state.global_step))


def evaluate(run: Run) -> None:
    """An evaluation: its row in the log, the best weights kept, early stopping decided."""
    cfg, state = run.cfg, run.state
    metrics = run.evaluator.run(run.model)
    run.last_eval_step = state.global_step
    run.logger.log(state.global_step, metrics, prefix="eval")
    if record_metric(state, metrics, run.metric_name, run.greater_is_better):
        run.best_weights = trainable_state(run.accelerator.unwrap_model(run.model))
        run.log(f"new best {run.metric_name}={state.best_metric:.4f} at step {state.global_step}")
    elif cfg.train.early_stopping_patience and state.evals_without_improvement >= cfg.train.early_stopping_patience:
        run.log(f"early stopping: {run.metric_name} did not improve for {state.evals_without_improvement} "
                f"evaluations (best {state.best_metric:.4f} at step {state.best_step})")
        run.stop = True


def epoch_progress(run: Run) -> float:
    return round(run.state.epoch + run.state.micro_batches_done / run.batches.micro_batches_per_epoch, 4)


def micro_batches(run: Run, epoch: int, done: int) -> Iterator[list[Batch]]:
    """The epoch's remaining steps, each as its micro-batches (CPU `Batch`es, their features filled in).

    Each micro-batch's samples (and the image features already cached) are read from disk when the loader gets to
    them — on GPUs by `dataloader_num_workers` processes, batches ahead; here by a thread, a few micro-batches
    ahead —: nothing of the epoch is held in memory. Features not cached yet are computed here, by the model's
    process."""
    windows = run.batches.windows(epoch, done)
    workers = loader_workers(run.cfg, run.accelerator.device)
    loader = torch.utils.data.DataLoader(
        MicroBatches(run.data.train, [batch for window in windows for batch in window]), batch_size=None,
        collate_fn=run.feature_cache.reader(), num_workers=workers)
    with read_ahead(iter(loader), depth=0 if workers else 2 * len(windows[0]) if windows else 0) as samples:
        for window in windows:
            yield [run.collate(run.feature_cache.fill(next(samples))) for _ in window]


def finish(run: Run) -> dict:
    """The last evaluation, the final (or best) adapter and the results files."""
    cfg, state, log = run.cfg, run.state, run.log
    eval_metrics: dict = {}
    if run.data.val and cfg.train.do_eval:
        if run.last_eval_step != state.global_step:
            eval_metrics = run.evaluator.run(run.model)
            run.logger.log(state.global_step, eval_metrics, prefix="eval")
            if record_metric(state, eval_metrics, run.metric_name, run.greater_is_better):
                run.best_weights = trainable_state(run.accelerator.unwrap_model(run.model))
        else:
            eval_metrics = {k: v for k, v in state.log_history[-1].items() if k.startswith("eval_")}
    unwrapped = run.accelerator.unwrap_model(run.model)
    if cfg.train.load_best_model_at_end and state.best_step is not None:
        restore_best(unwrapped, run.best_weights, run.output_dir / f"checkpoint-{state.best_step}")
        log(f"final adapter = best by {run.metric_name}: step {state.best_step} "
            f"({run.metric_name}={state.best_metric:.4f})")
    train_metrics = train_results(run)
    check_finite(run)
    run.accelerator.wait_for_everyone()
    final_weights = model_state_dict(run.accelerator, run.model)
    if run.is_main:
        save_final(unwrapped, run.processor, state, run.output_dir, final_weights)
        write_results(run, train_metrics, eval_metrics)
    run.accelerator.wait_for_everyone()
    run.feature_cache.close()
    run.accelerator.end_training()  # the trackers finish here
    return {**train_metrics, **eval_metrics}


def train_results(run: Run) -> dict:
    state, runtime = run.state, max(run.train_runtime, 1e-9)
    steps_run = state.global_step - run.steps_at_start
    per_step = run.cfg.train.per_device_train_batch_size * run.cfg.train.gradient_accumulation_steps * run.world
    return {"epoch": epoch_progress(run), "train_loss": state.train_loss_sum / max(state.global_step, 1),
            "train_runtime": round(runtime, 4), "train_samples_per_second": round(steps_run * per_step / runtime, 3),
            "train_steps_per_second": round(steps_run / runtime, 3)}


def write_results(run: Run, train_metrics: dict, eval_metrics: dict) -> None:
    """train_results.json, eval_results.json, all_results.json, the plots, and the metrics on the console."""
    state, output_dir, log, name = run.state, run.output_dir, run.log, run.metric_name
    write_json(output_dir / "train_results.json", train_metrics)
    if eval_metrics:
        write_json(output_dir / "eval_results.json", eval_metrics)
    best = {"best_step": state.best_step, f"best_{name}": state.best_metric} if state.best_step else {}
    write_json(output_dir / "all_results.json", {**train_metrics, **eval_metrics, **best})
    if run.cfg.finetune.plot_loss:
        for path in plot_curves(output_dir):
            log(f"plot: {path}")
    for title, metrics in (("train", train_metrics), ("eval", eval_metrics)):
        if metrics:
            log(f"***** {title} metrics *****")
            for key, value in metrics.items():
                log(f"  {key} = {value}")
    log(f"adapter and processor saved to {output_dir}")


def setup(cfg: Config) -> Run:
    """The accelerator, the data and the model (loaded side by side), the optimiser and schedule, a resume."""
    accelerator = make_accelerator(cfg)
    if accelerator.device.type == "cpu":
        share_cores_between_local_ranks()
    if zero_stage(accelerator) == 3 and cfg.train.load_best_model_at_end:
        raise VlmtuneError("load_best_model_at_end does not work with ZeRO-3 (the weights are partitioned over the "
                           "ranks); drop it and take the best checkpoint-N named in the log")
    dtype = compute_dtype(cfg.train.bf16, cfg.train.fp16 and torch.cuda.is_available())
    print(f"Process rank: {accelerator.process_index}, world size: {accelerator.num_processes}, device: "
          f"{accelerator.device}, distributed training: {accelerator.num_processes > 1}, compute dtype: {dtype}",
          flush=True)
    resume_from = decided_by_rank_zero(accelerator, lambda: check_output_dir(cfg))
    output_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output_dir)
    check_every_rank_sees(output_dir, accelerator)
    log = print if accelerator.is_main_process else (lambda *_: None)
    for note in inert_settings(cfg, accelerator.num_processes, torch.cuda.is_available()):
        log(f"note: {note}")
    model_dir, processor, data, model = setup_data_and_model(cfg, accelerator, dtype, log)
    model, optimizer, trainable = setup_training(cfg, accelerator, model, log)
    batches = EpochBatches(len(data.train), cfg.train.per_device_train_batch_size,
                           cfg.train.gradient_accumulation_steps, cfg.train.seed, accelerator.process_index,
                           accelerator.num_processes)
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else \
        max(1, math.ceil(cfg.train.num_train_epochs * batches.steps_per_epoch))
    warmup = cfg.train.warmup_steps if cfg.train.warmup_steps > 0 else math.ceil(cfg.train.warmup_ratio * total_steps)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.train.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    state = resume(cfg, accelerator, model, optimizer, scheduler, resume_from, total_steps, data, log)
    metric_name, greater_is_better = best_metric_rule(cfg, data.label_set)
    # Evaluation's batches are padded (scoring reads each row's last prompt token), training's packed or padded.
    collate = Collator(processor, vision_every_batch=vision_every_batch(model, accelerator))
    # Not under ZeRO-3: every rank would have to run the vision tower together, cached or not.
    feature_cache = ImageFeatureCache(model, processor, accelerator,
                                      enabled=can_cache(cfg) and zero_stage(accelerator) < 3,
                                      directory=output_dir / FEATURES_DIR / features_name(data.train, model_dir))
    run = Run(cfg=cfg, accelerator=accelerator, log=log, output_dir=output_dir, processor=processor, data=data,
              model=model, optimizer=optimizer, scheduler=scheduler, trainable=trainable, batches=batches,
              total_steps=total_steps, state=state, metric_name=metric_name, greater_is_better=greater_is_better,
              logger=TrainLogger(output_dir, accelerator.is_main_process, accelerator, total_steps, state.global_step),
              evaluator=Evaluator(cfg, data, processor, collate, accelerator), feature_cache=feature_cache,
              collate=packed(collate, model, accelerator, log) if packs(cfg) else collate)
    announce(run)
    return run


def setup_data_and_model(cfg: Config, accelerator, dtype: torch.dtype, log):
    """The processor, then the model loading in a thread while this one reads, checks and encodes the data.

    Loading is mostly importing transformers' modelling code (seconds) and reading weights; PIL and tokenizers
    release the GIL. Data errors still stop the run before any training. The processor comes first:
    transformers' lazy imports are not safe to run from two threads at once. ZeRO-3 partitions the weights while
    they load, with collectives: that stays on this thread. A QLoRA model loads straight onto this rank's device
    (bitsandbytes quantizes on arrival there)."""
    model_dir = resolve_model_dir(cfg.model.model_name_or_path, cfg.model.cache_dir, cfg.model.model_revision)
    processor = load_processor(model_dir, cfg.model.image_max_pixels, cfg.model.image_min_pixels, cfg.data.template,
                               cfg.data.enable_thinking)
    log(f"template: {processor.template.label} ({processor.family.name})")
    if packs(cfg):
        problem = packing_problem(processor.family, accelerator.device, packing_setting(cfg))
        if problem is not None:
            raise VlmtuneError(problem)
    quantization = quantization_of(cfg.model)
    if quantization is not None:
        log(f"QLoRA: the language model's linear layers load {quantization.label}; the vision tower, projector "
            f"and lm_head in {str(dtype).replace('torch.', '')}")
    model_loading = Background(load_model, model_dir, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
                               device=load_device(accelerator, quantization), quantization=quantization,
                               in_thread=zero_stage(accelerator) < 3)
    data = prepare_data(cfg, processor, log, node_ranks())
    log(describe_example(data.train[0], processor))
    model = model_loading.result()
    return model_dir, processor, data, model


def packs(cfg: Config) -> bool:
    return cfg.data.packing or cfg.data.neat_packing


def packing_setting(cfg: Config) -> str:
    return "neat_packing" if cfg.data.neat_packing else "packing"


def packed(collate: Collator, model, accelerator, log) -> Callable[[list[EncodedSample]], Batch]:
    """The training micro-batches as one packed row each (`data.packing`): the same samples as the padded batch,
    so the same loss and gradients, without the padding."""
    from vlmtune.data.packing import pack, rope_positions, sample_lengths, varlen_kwargs
    from vlmtune.model.compat import unwrap

    core = unwrap(accelerator.unwrap_model(model))
    positions, recurrent = rope_positions(core), collate.processor.family.recurrent_state
    log("packing: each micro-batch's samples in one row, no padding, no attention across samples")
    if getattr(core.config, "_attn_implementation", None) != "flash_attention_2":
        log("note: packing: without flash_attention_2 the packed row's attention is computed over the whole row under "
            "a block mask (row length² per layer), slower than padded batches; it pays with flash-attention's "
            "variable-length kernel on GPUs")

    def pack_micro_batch(samples: list[EncodedSample]) -> Batch:
        batch = pack(collate(samples), positions)
        if recurrent:
            batch.varlen = varlen_kwargs(sample_lengths(batch))
        return batch
    return pack_micro_batch


def keep_frozen_vision_out_of_backward(model) -> int:
    """Gradient checkpointing with an adapter makes transformers (and peft) mark the output of every sub-model's
    input embeddings as needing a gradient — the vision tower's patch embedding too. With the tower frozen, a
    forward that runs it (the feature cache off: ZeRO-3, `cache_image_features: false`) would then backpropagate
    through the whole tower for nothing. Those hooks come off a frozen tower; returns how many."""
    from vlmtune.families import parts_of
    from vlmtune.model.compat import unwrap

    tower = parts_of(unwrap(model)).vision_tower
    if tower is None or any(p.requires_grad for p in tower.parameters()):
        return 0
    removed = 0
    for module in tower.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "make_inputs_require_grads":  # transformers' enable_input_require_grads
                del module._forward_hooks[key]
                removed += 1
    return removed


def setup_training(cfg: Config, accelerator, model, log):
    """Gradient checkpointing, the adapter (or what trains), AdamW, and accelerate's wrapping."""
    from transformers import set_seed

    set_seed(cfg.train.seed)  # the adapter's initialisation starts from the seed, whatever ran before
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model, cfg.train.use_reentrant_gc)
        log(f"gradient checkpointing: on ({'reentrant' if cfg.train.use_reentrant_gc else 'non-reentrant'}; "
            f"disable_gradient_checkpointing: true turns it off)")
    model = apply_finetuning(model, cfg.finetune, log=log)
    log(parameter_summary(model))
    keep_frozen_vision_out_of_backward(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
         {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.train.learning_rate, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_epsilon)
    if zero_stage(accelerator) == 3:
        mark_zero3_leaves(model, log)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, trainable


def resume(cfg: Config, accelerator, model, optimizer, scheduler, resume_from: Path | None, total_steps: int,
           data, log) -> TrainerState:
    """The state to start from: a checkpoint's (after checking it belongs to this run and its data), or a fresh
    one."""
    output_dir = Path(cfg.train.output_dir)
    # The digest stats every image: rank 0 alone reads them, as it alone checks the data.
    digest = decided_by_rank_zero(accelerator, lambda: data_digest(data.train.conversations, data.val.conversations))
    shape = run_shape(cfg, accelerator.num_processes, len(data.train), digest)
    state = TrainerState(total_steps=total_steps, run=shape)
    if resume_from is not None:
        state = read_state(resume_from)
        check_resume_fits(state, shape, total_steps, resume_from)
        load_checkpoint(accelerator, model, optimizer, scheduler, resume_from)
        state.run = shape
        log(f"Resumed from {resume_from} at step {state.global_step} (epoch {state.epoch}, "
            f"{state.micro_batches_done} micro-batches into it)")
    elif cfg.train.overwrite_output_dir and accelerator.is_main_process:
        remove_previous_run(output_dir, log)
    if accelerator.is_main_process:
        truncate_log(output_dir, state.global_step)  # a fresh run into an overwritten dir starts a new log
    return state


def announce(run: Run) -> None:
    """The run's numbers, as transformers' Trainer prints them; the trackers started."""
    cfg, log, batches = run.cfg, run.log, run.batches
    batch_size, accum = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps
    log("***** Running training *****")
    log(f"  Num examples = {len(run.data.train):,}")
    log(f"  Num Epochs = {math.ceil(run.total_steps / batches.steps_per_epoch)}")
    log(f"  Instantaneous batch size per device = {batch_size}")
    log(f"  Total train batch size (w. parallel, distributed & accumulation) = {batch_size * run.world * accum}")
    log(f"  Gradient Accumulation steps = {accum}")
    log(f"  Total optimization steps = {run.total_steps:,}")
    log(f"  Number of trainable parameters = {sum(p.numel() for p in run.trainable):,}")
    if run.data.label_set and run.data.val:
        log(f"  Task metrics at each evaluation on labels {run.data.label_set}; best checkpoint by {run.metric_name}")
    if run.accelerator.log_with:
        start_trackers(run.accelerator, cfg.train.run_name or run.output_dir.name, run_config(cfg.to_flat_dict()))
    if run.feature_cache.enabled:
        log("  Vision tower frozen: each image's features are computed once and reused every epoch")


def save_final(model, processor, state: TrainerState, output_dir: Path, weights) -> None:
    """The final adapter and processor into output_dir: written into a temporary directory, then moved in
    file by file, so a failed write (a full disk) leaves no half-written adapter and is said in one line."""
    import shutil

    tmp = output_dir / ".tmp-checkpoint-final"  # cleaned up with the other temporaries by the next run
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        save_record(model, tmp)  # QLoRA: how the base was quantized, for predict / export to say
        processor.save_pretrained(tmp)
        state.save(tmp / "trainer_state.json")
        for path in sorted(tmp.iterdir()):
            os.replace(path, output_dir / path.name)
    except WRITE_ERRORS as exc:
        found = checkpoint_dirs(output_dir)
        then = (f"{found[-1].name} is intact: free space and resume with resume_from_checkpoint: true" if found
                else "no checkpoint was written: free space and start again")
        raise VlmtuneError(f"{output_dir}: writing the final adapter failed ({describe_write_error(exc)}); "
                           f"{then}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def features_name(train, model_dir: Path) -> str:
    """The feature cache of this training split on this model: a position's features are that sample's."""
    import hashlib

    keys = [[c.source, c.index] for c in train.conversations]
    identity = json.dumps([str(Path(model_dir).resolve()), train.store.key, keys])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch k of an epoch: the samples of its indices, read when asked for."""

    def __init__(self, samples, batches: list[list[int]]):
        self.samples, self.batches = samples, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> list[EncodedSample]:
        return [self.samples[i] for i in self.batches[k]]


def loader_workers(cfg: Config, device: torch.device) -> int:
    """Batch-building processes. On a CPU the cores already run torch's threads: extra processes only
    contend with them (measured: a 20× slower step), so batches are built in the training process."""
    return 0 if device.type == "cpu" else cfg.train.dataloader_num_workers


def save_due(cfg: Config, step: int, epoch_ends: bool) -> bool:
    strategy = cfg.train.save_strategy
    return (strategy == "steps" and step % cfg.train.save_steps == 0) or (strategy == "epoch" and epoch_ends)


def write_json(path: Path, values: dict) -> None:
    write_atomic(path, json.dumps(values, indent=2, ensure_ascii=False) + "\n")
