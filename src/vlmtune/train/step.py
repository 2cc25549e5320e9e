"""One optimisation step: the micro-batches' forwards and backwards, then the optimiser — nothing else.

The loss is normalised by the label tokens of the whole step (all micro-batches, all ranks), so gradient
accumulation and data parallelism give the gradient of one big batch; a plain mean per micro-batch would weight a
2-token answer like a 20-token one. Logits are computed only at the positions that predict a label token: with
Qwen's 152k vocabulary the full logits of an 880-token sample would be ~270 MB.

The step never waits for the device: what it needs to know about a batch (label positions, token counts) was
worked out on the CPU when the batch was built (`data.batch.Batch`), the logits are picked with integer indices,
the token count crosses ranks as a device tensor, and the loss and gradient norm come back as device tensors that
the loop reads only on logging steps. On a GPU the host queues the next micro-batch while the current one runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmtune.data.batch import Batch
from vlmtune.train.checkpoint import uses_deepspeed


def token_loss_sum(model, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the label tokens of a batch (`batch.num_label_tokens` of them)."""
    from vlmtune.model.compat import image_inputs, unwrap

    gather = batch.gather
    with image_inputs(unwrap(model), batch.model_inputs()) as inputs:
        logits = model(**inputs, use_cache=False, logits_to_keep=gather.columns).logits
    picked = logits[gather.rows, gather.picks]  # (label tokens, vocabulary): integer indices, no device sync
    return F.cross_entropy(picked.float(), gather.targets, reduction="sum")


@dataclass
class StepResult:
    """What one step did; `loss` (mean over the step's label tokens, all ranks) and `grad_norm` stay on the
    device until someone reads them."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | float | None
    samples: int
    tokens: int


def optimisation_step(model, optimizer, scheduler, accelerator, micro: list[Batch], params: list[torch.Tensor],
                      max_grad_norm: float, accum: int) -> StepResult:
    """Forward and backward of every micro-batch of the step (CPU batches, moved here), then clip, step, zero.
    `accum`: the run's gradient_accumulation_steps (DeepSpeed's engine counts micro-batches by it)."""
    world, device = accelerator.num_processes, accelerator.device
    # Label tokens of the whole step across all ranks: the loss denominator, summed on the device.
    n_tokens = torch.tensor(float(sum(b.num_label_tokens for b in micro)), device=device)
    denominator = (accelerator.reduce(n_tokens, reduction="sum") if world > 1 else n_tokens).clamp(min=1)
    step_loss = torch.zeros((), device=device)
    for k, batch in enumerate(micro):
        batch = batch.to(device)
        last = k == len(micro) - 1
        # DDP averages gradients over ranks, hence × world: the sum over ranks is what we want.
        with (contextlib.nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
            loss_sum = token_loss_sum(model, batch)
            backward(accelerator, loss_sum * world / denominator, last, accum)
        step_loss += loss_sum.detach()
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(params, max_norm)  # under DeepSpeed: the engine's norm
    optimizer.step()  # a no-op under DeepSpeed, whose engine stepped in backward
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss = (accelerator.reduce(step_loss, reduction="sum") if world > 1 else step_loss) / denominator
    return StepResult(loss=loss, grad_norm=grad_norm, samples=sum(b.num_samples for b in micro),
                      tokens=sum(b.num_tokens for b in micro))


def backward(accelerator, loss: torch.Tensor, last_micro_batch: bool, accum: int) -> None:
    """Backward of one micro-batch whose loss is already normalised for the whole step.

    Under DeepSpeed the engine divides the loss by its gradient_accumulation_steps (undone here) and runs
    the optimiser step itself at the boundary we mark; elsewhere optimizer.step() follows the window.
    """
    if uses_deepspeed(accelerator):
        accelerator.gradient_state._set_sync_gradients(last_micro_batch)  # the engine's accumulation boundary
        accelerator.backward(loss * accum)
    else:
        accelerator.backward(loss)
