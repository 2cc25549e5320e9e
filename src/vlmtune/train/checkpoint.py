"""checkpoint-N directories: written under a temporary name, renamed when complete.

A checkpoint holds the adapter (or trainable weights) in the usual peft/transformers format, the
processor files, and — unless save_only_model — optimizer, scheduler and per-rank RNG state plus
`trainer_state.json`, which is written last. A crash mid-write leaves only `.tmp-checkpoint-N`, which
is never mistaken for a checkpoint and is cleaned up by the next run; a checkpoint is removed the other
way round, renamed to such a name first (`remove_checkpoint`). Under DeepSpeed the optimizer state is
partitioned over the ranks: the engine writes it (with the weights) under `deepspeed/` through
accelerate's save_state.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from vlmtune.errors import VlmtuneError, brief
from vlmtune.files import describe_write_error
from vlmtune.model.quantize import save_record
from vlmtune.train.state import TrainerState

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def remove_stale_temporaries(output_dir: Path) -> None:
    """What a run killed while writing or removing a checkpoint left behind (`.tmp-checkpoint-*`)."""
    for path in output_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint directory: renamed out of sight first (atomically), then deleted, so a process killed
    meanwhile leaves a `.tmp-checkpoint-*` that the next run removes, never a checkpoint-N with files missing
    that still looks complete (to `sweep`, or to a reader of its trainer_state.json)."""
    aside = path.with_name(f".tmp-checkpoint-removed-{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    path.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def uses_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def model_state_dict(accelerator, model) -> dict | None:
    """The weights a checkpoint saves (every rank calls this): None — the model's own — except under
    DeepSpeed, whose engine holds them: the trainable parameters only, each gathered from the ranks in turn
    under ZeRO-3 (a partitioned weight reads empty anywhere else), copied to the CPU on the main process.
    Neither the frozen base model nor a 16-bit copy of it is gathered, copied or written (accelerate's
    get_state_dict copies the whole model on every rank, and under ZeRO-3 needs
    stage3_gather_16bit_weights_on_model_save)."""
    if not uses_deepspeed(accelerator):
        return None
    import contextlib

    import deepspeed

    out = {}
    for name, param in accelerator.unwrap_model(model).named_parameters():
        if not param.requires_grad:
            continue
        partitioned = hasattr(param, "ds_id")
        with deepspeed.zero.GatheredParameters([param]) if partitioned else contextlib.nullcontext():
            if accelerator.is_main_process:
                out[name] = param.detach().to("cpu", copy=True)
    return out


def save_checkpoint(accelerator, model, processor, optimizer, scheduler, state: TrainerState, output_dir: Path,
                    save_only_model: bool) -> Path:
    """Write checkpoint-{step} atomically (all ranks call this).

    A write that fails (a full disk, a quota) removes the partial `.tmp-checkpoint-N` and ends the run with
    one line that says so; the checkpoints written before are untouched, so the run can resume from them.
    """
    final = output_dir / f"checkpoint-{state.global_step}"
    tmp = output_dir / f".tmp-checkpoint-{state.global_step}"
    try:
        _write_checkpoint(accelerator, model, processor, optimizer, scheduler, state, tmp, save_only_model)
    except WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise VlmtuneError(f"{output_dir}: writing checkpoint-{state.global_step} failed ({describe_write_error(exc)}); "
                           f"{_survivors(output_dir)}") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            remove_checkpoint(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(accelerator, model, processor, optimizer, scheduler, state: TrainerState, tmp: Path,
                      save_only_model: bool) -> None:
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    weights = model_state_dict(accelerator, model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        save_record(unwrapped, tmp)  # QLoRA: how the base was quantized
        processor.save_pretrained(tmp)
    if not save_only_model:
        save_torch(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pth")
        if uses_deepspeed(accelerator):
            # every rank writes its optimizer partition; the frozen base model is not written again
            accelerator.save_state(str(tmp / "deepspeed"), exclude_frozen_parameters=True)
        elif accelerator.is_main_process:
            save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        if accelerator.is_main_process:
            save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(tmp / STATE_FILE)  # last: its presence marks the checkpoint complete


def save_torch(obj, path: Path) -> None:
    """torch.save, whose C++ writer reports a failed write (a full disk) as a cryptic RuntimeError: said plainly."""
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        raise OSError(f"{path.name} could not be written completely (a full disk or a quota?; torch: "
                      f"{brief(exc, 120)})") from None


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError from Python, RuntimeError from torch.save's C++ writer,
    SafetensorError from safetensors, VlmtuneError from write_atomic."""
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError, VlmtuneError


WRITE_ERRORS = _write_errors()


def _survivors(output_dir: Path) -> str:
    """What is left to resume from, for the message of a failed write."""
    found = checkpoint_dirs(output_dir)
    if not found:
        return "no earlier checkpoint exists; free space and start again"
    return (f"{found[-1].name} (step {found[-1].name.split('-')[1]}) is intact: free space and resume with "
            f"resume_from_checkpoint: true")


def read_state(checkpoint: Path) -> TrainerState:
    """The trainer state of a checkpoint directory, or a one-line error (not a checkpoint, damaged)."""
    if not (checkpoint / STATE_FILE).is_file():
        raise VlmtuneError(f"{checkpoint}: not a complete checkpoint (no {STATE_FILE})")
    return TrainerState.load(checkpoint / STATE_FILE)


def load_checkpoint(accelerator, model, optimizer, scheduler, checkpoint: Path) -> None:
    """Restore trainable weights, optimizer, scheduler and RNG (the state comes from `read_state`).

    Every file is checked as it is read: a truncated or foreign file, or weights of another shape (another
    lora_rank, another model), is a one-line error naming the file instead of a traceback.
    """
    if uses_deepspeed(accelerator):
        if not (checkpoint / "deepspeed").is_dir():
            raise VlmtuneError(f"{checkpoint}: has no DeepSpeed state (saved with save_only_model or without "
                               f"DeepSpeed); it cannot resume a DeepSpeed run")
        # weights and optimizer through the engine; the frozen base model was not saved (it is the loaded one)
        accelerator.load_state(str(checkpoint / "deepspeed"), load_module_strict=False)
    elif not (checkpoint / "optimizer.pt").is_file():
        raise VlmtuneError(f"{checkpoint}: saved with save_only_model, it has no optimizer state to resume from")
    else:
        load_trainable_weights(accelerator.unwrap_model(model), checkpoint)
        _restore(optimizer, checkpoint / "optimizer.pt")
    _restore(scheduler, checkpoint / "scheduler.pt")
    rng_file = checkpoint / f"rng_state_{accelerator.process_index}.pth"
    if rng_file.is_file():
        try:
            set_rng_state(read_torch_file(rng_file))
        except (KeyError, TypeError, ValueError) as exc:
            raise VlmtuneError(f"{rng_file}: not an RNG state ({exc.__class__.__name__})") from None


def read_torch_file(path: Path):
    """torch.load of a checkpoint file, or a one-line error when it is missing, truncated or not one."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise VlmtuneError(f"{path}: missing from the checkpoint") from None
    except Exception as exc:  # noqa: BLE001 — unpickling a damaged file fails in many ways
        raise VlmtuneError(f"{path}: cannot read ({describe_write_error(exc)}): the file is damaged; resume "
                           f"from another checkpoint-N") from None


def _restore(stateful, path: Path) -> None:
    """optimizer / scheduler `load_state_dict` from a file, a mismatch said in one line."""
    state = read_torch_file(path)
    try:
        stateful.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise VlmtuneError(f"{path}: does not fit this run ({describe_write_error(exc)})") from None


def read_safetensors(path: Path) -> dict:
    """All tensors of a .safetensors file, or a one-line error (missing, truncated, not safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise VlmtuneError(f"{path}: missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise VlmtuneError(f"{path}: not a readable safetensors file ({describe_write_error(exc)})") from None


def load_trainable_weights(model, directory: Path) -> None:
    """Load the adapter (peft) or full weights saved by `save_pretrained` back into a live model."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        weights = read_safetensors(directory / "adapter_model.safetensors")
        check_shapes(weights, get_peft_model_state_dict(model), directory / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise VlmtuneError(f"{directory}: adapter does not match the model ({unexpected[0]} …)")
        return
    # Full / freeze fine-tuning: reload through transformers so its checkpoint key mapping applies.
    from transformers import AutoModelForImageTextToText

    try:
        reloaded = AutoModelForImageTextToText.from_pretrained(str(directory), dtype=next(model.parameters()).dtype)
        model.load_state_dict(reloaded.state_dict())
    except (OSError, ValueError, RuntimeError) as exc:
        raise VlmtuneError(f"{directory}: cannot load its weights ({describe_write_error(exc)})") from None


def check_shapes(weights: dict, expected: dict, path: Path) -> None:
    """Saved tensors must be the live model's, name by name and shape by shape (another lora_rank, target
    list or base model otherwise)."""
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise VlmtuneError(f"{path}: has no {missing[0]} ({len(missing)} tensor(s) of this run missing: another "
                           f"lora_target or model?)")
    for key, tensor in weights.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise VlmtuneError(f"{path}: {key} is {list(tensor.shape)} there but {list(expected[key].shape)} in "
                               f"this run (another lora_rank or model)")


def rotate_checkpoints(output_dir: Path, limit: int | None, keep: Path | None) -> None:
    """Delete the oldest checkpoints beyond `limit`, never the best one (each out of sight first:
    `remove_checkpoint`)."""
    if not limit:
        return
    found = checkpoint_dirs(output_dir)
    removable = [p for p in found if p != keep]
    excess = len(found) - limit
    for path in removable[:max(0, excess)]:
        remove_checkpoint(path)
