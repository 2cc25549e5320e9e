"""Checkpoint sweep: score one dataset with the base model, every checkpoint-N and the final adapter.

Eval loss says little about a two-label task; the sweep measures what users pick a checkpoint by
(F1 by default) on data of their choice, in label-score mode (no generation, no invalid answers):

* the base model is loaded once; each adapter is attached with peft, evaluated, and removed again
  (`unload()`), so a sweep over 30 checkpoints loads 7B weights once;
* images are decoded and resized once per pixel-limit setting and reused by every point;
* the final adapter is matched to the checkpoint it equals (same weights file) to give it a step —
  with `load_best_model_at_end` that is the best step, otherwise usually the last.

Results go to OUTPUT_DIR/sweep.csv, sweep.json and sweep.png (metric against step), each written
atomically.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from vlmtune.errors import VlmtuneError
from vlmtune.files import write_atomic
from vlmtune.evaluate.metrics import compute_metrics

METRICS = ("f1", "accuracy", "precision", "recall", "specificity", "roc_auc", "pr_auc")
METRIC_ALIASES = {"auc": "roc_auc", "acc": "accuracy", "ap": "pr_auc"}
CSV_COLUMNS = ("name", "step", "adapter", "n", "accuracy", "precision", "recall", "f1", "specificity", "roc_auc",
               "pr_auc", "best_threshold", "n_invalid", "seconds")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class SweepPoint:
    name: str  # "base", "checkpoint-N", "final"
    step: int | None  # 0 for the base model; None when the final adapter's step is unknown
    adapter_dir: Path | None  # None for the base model


def normalise_metric(metric: str) -> str:
    metric = METRIC_ALIASES.get(metric.strip().lower(), metric.strip().lower())
    if metric not in METRICS:
        raise VlmtuneError(f"--metric must be one of {', '.join(METRICS)} (or auc), got '{metric}'")
    return metric


def _weights_digest(adapter_dir: Path) -> str | None:
    from vlmtune.infer.output import file_digest
    from vlmtune.model.adapter_files import adapter_files

    return file_digest(adapter_files(adapter_dir).weights)


def _logged_last_step(output_dir: Path) -> int | None:
    """The last optimisation step the run logged (trainer_log.jsonl or HF's trainer_state.json)."""
    steps = []
    log_file = output_dir / "trainer_log.jsonl"
    if log_file.is_file():
        for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key in ("step", "current_steps", "global_step"):
                if isinstance(entry, dict) and isinstance(entry.get(key), int):
                    steps.append(entry[key])
    state = output_dir / "trainer_state.json"
    if state.is_file():
        try:
            value = json.loads(state.read_text(encoding="utf-8")).get("global_step")
            if isinstance(value, int):
                steps.append(value)
        except (json.JSONDecodeError, AttributeError):
            pass
    return max(steps) if steps else None


def find_points(output_dir: str | Path, log: Callable[[str], None] = print) -> list[SweepPoint]:
    """base, every complete checkpoint-N (step order), and the final adapter if present. The incomplete
    checkpoint-N directories (a removal or a write that did not finish) are named in one line and left out."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise VlmtuneError(f"{output_dir}: output directory not found")
    found = sorted((int(m.group(1)), child) for child in output_dir.iterdir()
                   if (m := CHECKPOINT_RE.match(child.name)) and child.is_dir())
    holders = [d for _, d in found] + ([output_dir] if (output_dir / "adapter_config.json").is_file() else [])
    expected = {name for d in holders for name in record_files() if (d / name).is_file()}
    checkpoints, incomplete = [], []
    for step, directory in found:
        problem = checkpoint_problem(directory, expected)
        if problem is None:
            checkpoints.append(SweepPoint(directory.name, step, directory))
        else:
            incomplete.append(f"{directory.name} ({problem})")
    if incomplete:
        log(f"left out {len(incomplete)} incomplete checkpoint(s), a removal or a write that did not finish: "
            f"{', '.join(incomplete)}")
    points = [SweepPoint("base", 0, None), *checkpoints]
    if (output_dir / "adapter_config.json").is_file():
        digest = _weights_digest(output_dir)
        same = [p for p in checkpoints if digest is not None and _weights_digest(p.adapter_dir) == digest]
        step = same[-1].step if same else _logged_last_step(output_dir)
        points.append(SweepPoint("final", step, output_dir))
    if len(points) == 1:
        raise VlmtuneError(f"{output_dir}: no adapter found (neither checkpoint-N/adapter_config.json nor "
                           f"adapter_config.json)")
    return points


def record_files() -> tuple[str, ...]:
    """What a checkpoint holds besides its adapter when the run's other checkpoints (or its final adapter) do: the
    trainer state (written last), the pixel limits and the chat template the sweep evaluates it with."""
    from vlmtune.data.processor import TEMPLATE_RECORD
    from vlmtune.model.adapter_files import PREPROCESSOR_CONFIG

    return "trainer_state.json", PREPROCESSOR_CONFIG, TEMPLATE_RECORD


def checkpoint_problem(directory: Path, expected: set[str]) -> str | None:
    """Why a checkpoint-N cannot be evaluated as it was trained (a file missing or damaged), None when complete."""
    from vlmtune.model.adapter_files import ADAPTER_CONFIG, adapter_files

    if not (directory / ADAPTER_CONFIG).is_file():
        return f"no {ADAPTER_CONFIG}"
    missing = sorted(name for name in expected if not (directory / name).is_file())
    if missing:
        return f"no {missing[0]}"
    try:
        adapter_files(directory)
    except VlmtuneError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def evaluate_points(points: Sequence[SweepPoint], conversations, labels: list[str], positive: str,
                    model_name_or_path: str | None = None, batch_size: int = 8,
                    image_max_pixels: int | None = None, image_min_pixels: int | None = None,
                    bf16: bool = False, fp16: bool = False, default_system: str | None = None,
                    template: str | None = None, enable_thinking: bool | None = None,
                    log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Metrics of every point on the conversations (label scoring), one row per point, in order."""
    from vlmtune.data.encode import EncodeError, load_images
    from vlmtune.data.processor import load_processor
    from vlmtune.infer.engine import (attach_adapter, inference_dtype, pick_device, resolve_pixel_limits,
                                      resolve_template)
    from vlmtune.model.adapter_files import adapter_files
    from vlmtune.infer.scoring import score_conversations
    from vlmtune.model.load import load_model, resolve_model_dir

    adapters = [p for p in points if p.adapter_dir is not None]
    # The run's own pixel limits and template, for the base model too.
    reference = adapters[-1].adapter_dir if adapters else None
    if not model_name_or_path:
        model_name_or_path = adapter_files(reference).base_model if reference is not None else None
        if not model_name_or_path:
            raise VlmtuneError("the adapters do not name their base model (base_model_name_or_path); "
                               "pass --model_name_or_path")
    model_dir = resolve_model_dir(model_name_or_path)
    device = pick_device()
    dtype = inference_dtype(device, bf16, fp16)
    model = load_model(model_dir, dtype=dtype, device=device)
    model.eval()
    log(f"base model: {model_dir} ({str(dtype).replace('torch.', '')} on {device}); "
        f"{len(conversations)} samples, labels {labels}, positive {positive!r}")

    processors: dict[tuple, Any] = {}
    images: dict[tuple, list] = {}
    truth = [c.answer.strip() for c in conversations]
    rows = []
    for point in points:
        limits = resolve_pixel_limits(point.adapter_dir or reference, image_max_pixels, image_min_pixels)
        chat = resolve_template(point.adapter_dir or reference, template, enable_thinking)
        if (limits, chat) not in processors:
            processors[limits, chat] = load_processor(model_dir, *limits, *chat)
        if limits not in images:
            try:
                images[limits] = [load_images(c, processors[limits, chat]) for c in conversations]
            except EncodeError as exc:
                raise VlmtuneError(f"{exc} (field '{exc.field}')") from None
        processor = processors[limits, chat]
        started = time.perf_counter()
        scored = attach_adapter(model, point.adapter_dir, model_dir) if point.adapter_dir is not None else model
        probs = score_conversations(scored, processor, conversations, labels, batch_size, default_system,
                                    images[limits])
        if point.adapter_dir is not None:
            model = scored.unload()  # the base model again, LoRA layers removed (not merged)
        predicts = [max(p, key=p.get) for p in probs]
        metrics = compute_metrics(truth, predicts, positive=positive, label_set=labels,
                                  positive_scores=[p[positive] for p in probs])
        seconds = time.perf_counter() - started
        row = {"name": point.name, "step": point.step,
               "adapter": str(point.adapter_dir) if point.adapter_dir else None,
               **{k: metrics.get(k) for k in CSV_COLUMNS if k in metrics}, "seconds": round(seconds, 3),
               "metrics": metrics}
        rows.append(row)
        log(f"  {point.name:<18} step {'?' if point.step is None else point.step:>6}  "
            f"f1 {_fmt(row['f1'])}  accuracy {_fmt(row['accuracy'])}  auc {_fmt(row.get('roc_auc'))}  "
            f"({seconds:.1f} s)")
    return rows


def best_row(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The row with the highest metric (the earliest on ties); None when the metric is undefined everywhere."""
    best = None
    for row in rows:
        value = row.get(metric)
        if value is not None and (best is None or value > best[metric]):
            best = row
    return best


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_sweep_table(rows: Sequence[dict[str, Any]], metric: str) -> str:
    from vlmtune.evaluate.table import pad, width

    columns = ["name", "step", "n", "accuracy", "precision", "recall", "f1", "roc_auc", "n_invalid"]
    if metric not in columns:
        columns.insert(3, metric)
    cells = [[_fmt(row.get(c)) if c != "step" or row.get(c) is not None else "?" for c in columns] for row in rows]
    widths = [max(width(c), *(width(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(pad(c, w, right=i > 0) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines += ["  ".join(pad(v, w, right=i > 0) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def render_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in CSV_COLUMNS})
    return buffer.getvalue()


def render_plot(rows: Sequence[dict[str, Any]], metric: str, title: str) -> bytes:
    """PNG of the metric against step: checkpoints as a line, base and final marked, best circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = title if title.isascii() else metric  # the default fonts have no CJK glyphs
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ckpts = [r for r in rows if r["name"].startswith("checkpoint-") and r.get(metric) is not None]
    if ckpts:
        ax.plot([r["step"] for r in ckpts], [r[metric] for r in ckpts], "o-", color="tab:blue", label="checkpoints")
    base = next((r for r in rows if r["name"] == "base"), None)
    if base is not None and base.get(metric) is not None:
        ax.axhline(base[metric], color="gray", linestyle=":", label=f"base model ({base[metric]:.3f})")
        ax.plot([0], [base[metric]], "s", color="gray")
    final = next((r for r in rows if r["name"] == "final"), None)
    if final is not None and final.get(metric) is not None:
        if final["step"] is not None:
            ax.plot([final["step"]], [final[metric]], "*", markersize=14, color="tab:orange",
                    label=f"final adapter ({final[metric]:.3f})")
        else:
            ax.axhline(final[metric], color="tab:orange", linestyle="--", label=f"final adapter ({final[metric]:.3f})")
    best = best_row(rows, metric)
    if best is not None and best["step"] is not None:
        ax.plot([best["step"]], [best[metric]], "o", markersize=16, markerfacecolor="none", color="tab:red",
                label=f"best: {best['name']}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


SWEEP_FILES = ("sweep.csv", "sweep.json", "sweep.png")


def write_sweep(output_dir: str | Path, rows: Sequence[dict[str, Any]], metric: str, dataset: str,
                labels: list[str], positive: str) -> dict[str, Any] | None:
    """sweep.csv, sweep.json and sweep.png into output_dir (each atomically); returns the best row."""
    output_dir = Path(output_dir)
    best = best_row(rows, metric)
    summary = {
        "dataset": dataset, "metric": metric, "labels": labels, "positive": positive,
        "best": None if best is None else {"name": best["name"], "step": best["step"], "adapter": best["adapter"],
                                           metric: best[metric]},
        "points": [dict(row) for row in rows],
    }
    write_atomic(output_dir / "sweep.csv", render_csv(rows))
    write_atomic(output_dir / "sweep.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    write_atomic(output_dir / "sweep.png", render_plot(rows, metric, f"{metric} vs step ({dataset})"))
    return best


def sweep_labels(cfg, conversations) -> tuple[list[str], str]:
    """(label set with the positive label first, positive label): the given labels or the dataset's label set;
    every reference answer must be one of them."""
    from vlmtune.labels import answers_outside, positive_first, resolve_label_set

    labels, _ = resolve_label_set(cfg.data.labels, [c.answer for c in conversations], cfg.data.positive_label)
    if labels is None:
        raise VlmtuneError(f"dataset '{cfg.data.dataset}': the answers do not form a small closed label set; "
                           f"pass --labels a,b")
    positive = cfg.data.positive_label.strip()
    if positive not in labels:
        raise VlmtuneError(f"--positive {positive!r} is not one of the labels {labels}")
    outside = answers_outside(labels, [c.answer for c in conversations])
    if outside:
        raise VlmtuneError(f"dataset '{cfg.data.dataset}': answer {outside[0]!r} is not one of the labels {labels}")
    return positive_first(labels, positive), positive


def run_sweep(output_dir: str | Path, cfg, metric: str = "f1", batch_size: int = 8,
              explicit: set[str] | frozenset[str] = frozenset(), log=print) -> dict[str, Any] | None:
    """Score cfg's dataset at every point of a training output_dir, print the table, write sweep.csv / .json /
    .png; returns the best row. Image pixel limits, template and enable_thinking are the adapters' unless in
    `explicit` (the keys the user set); the base model is the adapters' base unless model_name_or_path is set."""
    from vlmtune.files import refuse_input_as_output
    from vlmtune.infer.predict import load_test_data, prediction_inputs

    metric = normalise_metric(metric)
    if batch_size <= 0:
        raise VlmtuneError(f"--batch_size must be > 0, got {batch_size}")
    points = find_points(output_dir, log)
    conversations = load_test_data(cfg)
    inputs = prediction_inputs(cfg, conversations)
    for name in SWEEP_FILES:  # a dataset kept in the run directory as sweep.json is not written over
        refuse_input_as_output(Path(output_dir) / name, inputs, "sweep output")
    labels, positive = sweep_labels(cfg, conversations)
    log(f"sweep of {output_dir}: {', '.join(p.name for p in points)}")
    given = {key: getattr(cfg.model if key.startswith("image") else cfg.data, key) if key in explicit else None
             for key in ("image_max_pixels", "image_min_pixels", "template", "enable_thinking")}
    rows = evaluate_points(points, conversations, labels, positive, cfg.model.model_name_or_path, batch_size,
                           given["image_max_pixels"], given["image_min_pixels"], cfg.train.bf16, cfg.train.fp16,
                           cfg.data.default_system, given["template"], given["enable_thinking"], log=log)
    best = write_sweep(output_dir, rows, metric, cfg.data.dataset, labels, positive)
    log("\n" + format_sweep_table(rows, metric) + "\n")
    if best is None:
        log(f"best: none ({metric} is undefined at every point)")
    else:
        step = "" if best["step"] is None else f", step {best['step']}"
        where = f" ({best['adapter']})" if best["adapter"] else ""
        log(f"best by {metric}: {best['name']}{step}{where}: {best[metric]:.4f}")
    out = Path(output_dir)
    log(f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    return best
