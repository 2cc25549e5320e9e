"""Evaluation during training: eval_loss over the validation split and, for closed label sets, the task metrics
from label scoring — which pick the best checkpoint (`record_metric`) and drive early stopping."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from vlmtune.config import Config
from vlmtune.data.batch import IGNORE_INDEX
from vlmtune.data.encode import EncodedSample
from vlmtune.errors import VlmtuneError
from vlmtune.train.state import TrainerState
from vlmtune.train.step import token_loss_sum


class Evaluator:
    """eval_loss over the validation split and, for closed label sets, the task metrics."""

    def __init__(self, cfg: Config, data, processor, collate, accelerator):
        self.cfg, self.processor, self.collate, self.accelerator = cfg, processor, collate, accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        self.val = data.val  # read batch by batch (from the encoded store): nothing of it is kept in memory
        self.positions = list(range(rank, len(data.val), world))
        self.n_real = len(self.positions)
        if world > 1 and data.val:
            # Every rank must run as many forwards: DDP broadcasts buffers in the first forward after a step
            # and ZeRO-3 gathers each layer's weights from all ranks in every forward, so a rank with fewer
            # (or no) validation samples would leave the others waiting forever. A short shard is topped up
            # with a copy of a sample that has no labelled tokens (it adds nothing to eval_loss) and whose
            # task-metric row is dropped.
            self.positions += [len(data.val) - 1] * (math.ceil(len(data.val) / world) - self.n_real)
        self.has_val = bool(data.val)
        self.label_set = data.label_set
        positive = cfg.data.positive_label
        self.positive = positive if not self.label_set or positive in self.label_set else self.label_set[0]

    def due(self, step: int, epoch_ends: bool) -> bool:
        strategy = self.cfg.train.eval_strategy
        if not self.has_val or strategy == "no":
            return False
        return (strategy == "steps" and step % self.cfg.train.eval_steps == 0) or (strategy == "epoch" and epoch_ends)

    @torch.no_grad()
    def run(self, model) -> dict:
        start = time.time()
        accelerator, size = self.accelerator, self.cfg.train.per_device_eval_batch_size
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), device=accelerator.device)
        tokens = torch.zeros((), device=accelerator.device)
        for i in range(0, len(self.positions), size):
            batch = self.collate(self.samples(i, i + size))
            with accelerator.autocast():
                loss_sum += token_loss_sum(model, batch.to(accelerator.device))
            tokens += batch.num_label_tokens
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
        tokens = accelerator.reduce(tokens, reduction="sum")
        metrics = {"eval_loss": (loss_sum / tokens.clamp(min=1)).item()}
        if self.label_set:
            metrics.update(self.task_metrics(model))
        if was_training:
            model.train()
        metrics["eval_runtime"] = round(time.time() - start, 4)
        return metrics

    def samples(self, start: int, stop: int) -> list[EncodedSample]:
        """The shard's samples start..stop, read now; the fillers' labels all ignored."""
        out = []
        for k in range(start, min(stop, len(self.positions))):
            sample = self.val[self.positions[k]]
            if k >= self.n_real:
                sample = dataclasses.replace(sample, labels=torch.full_like(sample.labels, IGNORE_INDEX))
            out.append(sample)
        return out

    def task_metrics(self, model) -> dict:
        from vlmtune.evaluate.metrics import compute_metrics, scalar_metrics
        from vlmtune.infer.scoring import score_conversations

        size, rows = self.cfg.train.per_device_eval_batch_size, []
        for i in range(0, len(self.positions), size):
            samples = self.samples(i, i + size)
            if self.collate.placeholder is not None and not any(s.images for s in samples):
                self.run_vision_tower(model)
            with self.accelerator.autocast():
                scores = score_conversations(self.accelerator.unwrap_model(model), self.processor,
                                             [s.conversation for s in samples], self.label_set, batch_size=size,
                                             default_system=self.cfg.data.default_system,
                                             images=[s.images for s in samples])
            rows += [(s.conversation.answer, max(p, key=p.get), p[self.positive])
                     for k, (s, p) in enumerate(zip(samples, scores), start=i) if k < self.n_real]
        rows = [r for part in self.accelerator.gather_for_metrics([rows], use_gather_object=True) for r in part]
        labels, predicts, positive_scores = (list(x) for x in zip(*rows))
        metrics = compute_metrics(labels, predicts, self.positive, self.label_set, positive_scores)
        return scalar_metrics(metrics, prefix="eval_")


    @torch.no_grad()
    def run_vision_tower(self, model) -> None:
        """The vision tower on the placeholder image, its output unused: scoring a chunk without images must still
        take part in the tower's collectives, as the other ranks' chunks do (see `vision_every_batch`)."""
        from vlmtune.data.images import image_grids
        from vlmtune.families import parts_of
        from vlmtune.model.compat import unwrap
        from vlmtune.model.vision import vision_encoder

        images, settings = self.collate.placeholder.images, self.processor.image_processor
        encoder = vision_encoder(parts_of(unwrap(self.accelerator.unwrap_model(model))).vision_tower)
        with self.accelerator.autocast():
            encoder.still_images(images, image_grids(images, settings).to(self.accelerator.device), settings)


def record_metric(state: TrainerState, metrics: dict, name: str, greater_is_better: bool) -> bool:
    """Add an evaluation to the history; True when it is the best so far."""
    state.log_history.append({"step": state.global_step, **metrics})
    value = metrics.get(name)
    if value is None or not math.isfinite(value):  # a nan evaluation is never the best one
        return False
    better = state.best_metric is None or (value > state.best_metric if greater_is_better else value < state.best_metric)
    if better:
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.global_step, 0
    else:
        state.evals_without_improvement += 1
    return better


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def restore_best(model, best_weights: dict | None, checkpoint: Path) -> None:
    """Put the best weights back: from memory, or from its checkpoint after a resume."""
    if best_weights is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in best_weights.items():
                params[name].copy_(value)
        return
    if checkpoint.is_dir():
        from vlmtune.train.checkpoint import load_trainable_weights

        load_trainable_weights(model, checkpoint)
        return
    raise VlmtuneError(f"{checkpoint}: the best checkpoint is gone (save_total_limit?), cannot load the best model")
