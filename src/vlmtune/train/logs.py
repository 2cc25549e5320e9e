"""Where training reports go: the console, `trainer_log.jsonl`, the trackers (`train.trackers`) and the plots.

Only the main process writes. Rows of trainer_log.jsonl are either training rows (`loss`, `lr`,
`grad_norm`, throughput, memory) or evaluation rows (`eval_loss` and the task metrics `eval_f1`, …);
both carry `step` (and LLaMA-Factory's `current_steps` / `total_steps`) so existing tools read them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.progress import Progress, clock

LOG_FILE = "trainer_log.jsonl"
PLOTTED_EVAL_KEYS = ("eval_loss", "eval_accuracy", "eval_precision", "eval_recall", "eval_f1", "eval_roc_auc",
                     "eval_pr_auc")


class TrainLogger:
    def __init__(self, output_dir: Path, is_main: bool, accelerator, total_steps: int, start_step: int = 0):
        """`accelerator`: its trackers (`init_trackers` done) receive every row as `{prefix}/{key}`."""
        self.output_dir = output_dir
        self.is_main = is_main
        self.total_steps = total_steps
        self.start_time = time.time()
        self.start_step = start_step
        self.accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        self.progress: Progress | None = None

    def start_progress(self, enabled: bool) -> Progress:
        """The training bar on a terminal; without one (a log file, CI, `nohup`) each row's console line carries
        the progress instead, so a log holds one line per logging step and no carriage-return redraws."""
        self.progress = Progress(self.total_steps, self.start_step, desc="train", enabled=self.is_main and enabled)
        return self.progress

    def info(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def _timing(self, step: int) -> dict:
        elapsed = time.time() - self.start_time
        done = max(step - self.start_step, 1)
        remaining = elapsed / done * max(self.total_steps - step, 0)
        return {"current_steps": step, "total_steps": self.total_steps,
                "percentage": round(100 * step / max(self.total_steps, 1), 2),
                "elapsed_time": clock(elapsed), "remaining_time": clock(remaining)}

    def log(self, step: int, values: dict, prefix: str) -> None:
        """One row: to the jsonl, to TensorBoard as `{prefix}/{key}`, and a console line."""
        if not self.is_main:
            return
        row = {"step": step, **{k: _round(v) for k, v in values.items()}, **self._timing(step)}
        try:
            with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as exc:  # a full disk: one line, and the checkpoints written so far stay
            raise VlmtuneError(f"{self.output_dir / LOG_FILE}: cannot write ({exc.strerror or exc}); the checkpoints "
                               f"written so far are intact (resume_from_checkpoint: true)") from None
        if self.accelerator is not None:
            scalars = {}
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    tag = key[len("eval_"):] if key.startswith("eval_") else key
                    tag = "learning_rate" if tag == "lr" else tag
                    scalars[f"{prefix}/{tag}"] = value
            self.accelerator.log(scalars, step=step)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items() if v is not None)
        if prefix == "train" and (self.progress is None or self.progress.bar is None):
            shown += f" ({row['percentage']:g}%, {row['elapsed_time']} elapsed, {row['remaining_time']} left)"
        from tqdm.auto import tqdm

        tqdm.write(f"[{prefix} step {step}/{self.total_steps}] {shown}")  # above the progress bar, not into it


def _round(value):
    return round(value, 6) if isinstance(value, float) else value


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def read_log(output_dir: Path) -> list[dict]:
    path = output_dir / LOG_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
    return rows


def truncate_log(output_dir: Path, last_step: int) -> None:
    """On resume: drop rows written after the checkpoint we resume from, so no step appears twice."""
    path = output_dir / LOG_FILE
    if path.is_file():
        rows = [r for r in read_log(output_dir) if r.get("step", 0) <= last_step]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def plot_curves(output_dir: Path) -> list[Path]:
    """training_loss.png (with a smoothed line), training_eval_loss.png and one per task metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(output_dir)
    written = []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    series = {"loss": train}
    # One plot per headline metric; counts, thresholds and timings stay in the log.
    eval_keys = [k for k in PLOTTED_EVAL_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    for key in eval_keys:
        series[key] = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    for key, points in series.items():
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.plot(steps, values, color="#1f77b4", alpha=0.4 if key == "loss" else 1.0, label="original",
                marker=None if key == "loss" else "o")
        if key == "loss" and len(values) > 2:
            ax.plot(steps, _smooth(list(values)), color="#1f77b4", label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} of {output_dir.name}")
        ax.legend()
        fig.tight_layout()
        name = "training_loss.png" if key == "loss" else f"training_{key}.png"
        fig.savefig(output_dir / name, dpi=100)
        plt.close(fig)
        written.append(output_dir / name)
    return written


def _smooth(values: list[float]) -> list[float]:
    """Exponential moving average with a weight that grows with the series (LLaMA-Factory's curve)."""
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for value in values:
        last = last * weight + (1 - weight) * value
        out.append(last)
    return out
