"""What a run must remember to resume exactly, saved as `trainer_state.json` in every checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.files import read_json_object, write_atomic

# Counters that must be whole numbers ≥ 0 for a resume to mean anything.
COUNTERS = ("global_step", "epoch", "micro_batches_done", "total_steps", "evals_without_improvement", "samples_seen")


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0  # the epoch in progress
    micro_batches_done: int = 0  # micro-batches of that epoch already trained (per rank)
    total_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    train_loss_sum: float = 0.0  # sum of step losses, for the final mean train_loss
    samples_seen: int = 0
    log_history: list[dict] = field(default_factory=list)
    # The run's shape (batch geometry, examples, adapter): a resume must have the same (train.loop.run_shape).
    # Empty in checkpoints written before it was recorded.
    run: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        """The state in `path`, or a one-line error saying why it is not one (damaged, other keys, bad values)."""
        data = read_json_object(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VlmtuneError(f"{path}: not a vlmtune trainer state (unknown key '{unknown[0]}')")
        for key in COUNTERS:
            value = data.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise VlmtuneError(f"{path}: field '{key}' must be a whole number ≥ 0, got {value!r}")
        for key, nullable in (("best_metric", True), ("train_loss_sum", False)):
            value = data.get(key, None if nullable else 0.0)
            if not (value is None and nullable) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise VlmtuneError(f"{path}: field '{key}' must be a number, got {value!r}")
        best_step = data.get("best_step")
        if best_step is not None and (isinstance(best_step, bool) or not isinstance(best_step, int)):
            raise VlmtuneError(f"{path}: field 'best_step' must be a step number or null, got {best_step!r}")
        for key, kind in (("log_history", list), ("run", dict)):
            if not isinstance(data.get(key, kind()), kind):
                raise VlmtuneError(f"{path}: field '{key}' must be a {kind.__name__}, got {data[key]!r}")
        return cls(**data)
