"""What a run must remember to resume exactly, saved as `trainer_state.json` in every checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


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

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        return cls(**json.loads(path.read_text(encoding="utf-8")))
