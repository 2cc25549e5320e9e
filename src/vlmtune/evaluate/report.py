"""One self-contained HTML report of a predictions file (and optionally of the training run).

Contents: the metrics table, the confusion matrix, PR and ROC curves and a P(positive) histogram
per true label (when the file has ``scores``), the training loss and metric curves (from
``trainer_log.jsonl`` of a run directory), and a gallery of the misclassified images with their
id, label, answer, scores and rules text.

Self-contained means no URL at all: thumbnails are JPEG data URLs, plots are PNG data URLs, CSS is
inline. The file can be mailed or opened offline. Plots never contain CJK text (matplotlib's default
font has no CJK glyphs and would print boxes and warnings): they say "label 0/1" and the HTML
next to them says which label that is.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

from vlmtune.errors import VlmtuneError
from vlmtune.evaluate.metrics import (POSITIVE, load_predictions, metrics_of_file, pr_curve, positive_scores_of,
                                     roc_curve)
from vlmtune.evaluate.table import fmt, metric_rows
from vlmtune.files import refuse_input_as_output, write_atomic

THUMB_SIDE = 320  # px, longest side of a gallery thumbnail
# eval_* keys of trainer_log.jsonl that are timings, not task metrics.
NOT_METRICS = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC",sans-serif;
     margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left} .diag{background:#e4f4e4;font-weight:bold}
.plots img{max-width:48%;margin:4px;vertical-align:top} .note{color:#666}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;width:340px;font-size:13px}
.card img{max-width:320px;max-height:320px;display:block;margin:2px 0}
.missing{width:320px;height:80px;background:#eee;color:#a00;display:flex;align-items:center;
         justify-content:center;text-align:center;word-break:break-all;font-size:12px}
.bad{color:#b00;font-weight:bold} pre{white-space:pre-wrap;font-size:12px;background:#f7f7f7;padding:6px}
"""


def esc(value: Any) -> str:
    """HTML-escape anything (prompts and answers are user text)."""
    return html.escape(str(value), quote=True)


def png_data_url(fig: Figure) -> str:
    """Render a matplotlib figure to a ``data:image/png;base64,...`` URL."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(path: Path) -> str | None:
    """A JPEG data URL of the image scaled to at most THUMB_SIDE px, or None if unreadable."""
    from PIL import Image  # only needed for galleries

    try:
        with Image.open(path) as img:
            img.thumbnail((THUMB_SIDE, THUMB_SIDE))
            if img.mode != "RGB":
                # Flatten transparency onto white: JPEG has no alpha, and black would hide dark objects.
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, "white")
                img.paste(rgba, mask=rgba.getchannel("A"))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=82)
    except Exception:  # noqa: BLE001 - PIL raises many types (even SyntaxError); a report must not crash
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Sections


def metrics_html(metrics: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in metric_rows(metrics))
    return f'<h2 id="metrics">Metrics</h2><table>{rows}</table>'


def confusion_html(metrics: dict[str, Any]) -> str:
    cm = metrics["confusion_matrix"]
    head = "".join(f"<th>{esc(c)}</th>" for c in cm["columns"])
    body = ""
    for i, (label, row) in enumerate(zip(cm["rows"], cm["matrix"])):
        cells = "".join(f'<td{" class=diag" if i == j else ""}>{v}</td>' for j, v in enumerate(row))
        body += f"<tr><th>{esc(label)}</th>{cells}</tr>"
    return (f'<h2 id="confusion">Confusion matrix</h2><p class="note">rows: true label, columns: answer '
            f'("invalid": equal to no label)</p><table><tr><th>true \\ answer</th>{head}</tr>{body}</table>')


def score_plots_html(records: Sequence[dict[str, Any]], metrics: dict[str, Any], scores: list[float]) -> str:
    """PR curve, ROC curve and the P(positive) histogram per true label."""
    positive = metrics["positive"]
    pos_name = f"label {metrics['labels'].index(positive)}"  # ASCII stand-in for the CJK label in plots
    truth = [r["label"].strip() for r in records]
    is_pos = [t == positive for t in truth]
    imgs = []

    recall, precision, _ = pr_curve(is_pos, scores)
    if recall:
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        # Start at recall 0 with the first precision, as the curve is usually drawn.
        ax.plot([0.0] + recall, precision[:1] + precision, marker=".", label=f"AP = {fmt(metrics['pr_auc'])}")
        if metrics["best_threshold_recall"] is not None:
            ax.plot([metrics["best_threshold_recall"]], [metrics["best_threshold_precision"]], "r*", markersize=12,
                    label=f"best F1 at t = {metrics['best_threshold']:.3f}")
        ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall (positive = {pos_name})",
               xlim=(0, 1.02), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        imgs.append(png_data_url(fig))
    fpr, tpr = roc_curve(is_pos, scores)
    if fpr:
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        ax.plot(fpr, tpr, marker=".", label=f"AUC = {fmt(metrics['roc_auc'])}")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC (positive = {pos_name})",
               xlim=(0, 1.02), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        imgs.append(png_data_url(fig))

    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    bins = [i / 20 for i in range(21)]
    for index, label in enumerate(metrics["labels"]):
        values = [s for s, t in zip(scores, truth) if t == label]
        if values:  # legend text stays ASCII: "label i", mapped to the real label in the HTML
            ax.hist(values, bins=bins, alpha=0.55, label=f"true label {index} (n={len(values)})")
    if metrics["best_threshold"] is not None:
        ax.axvline(metrics["best_threshold"], color="red", linestyle="--", label="best-F1 threshold")
    ax.set(xlabel=f"P({pos_name})", ylabel="examples", title="Score histogram per true label")
    ax.legend()
    imgs.append(png_data_url(fig))

    legend = ", ".join(f"label {i} = {esc(label)}" for i, label in enumerate(metrics["labels"]))
    notes = "" if recall and fpr else '<p class="note">PR/ROC curves need both classes among the labels.</p>'
    tags = "".join(f'<img alt="plot" src="{u}">' for u in imgs)
    return (f'<h2 id="curves">Score curves</h2><p class="note">{legend}; the positive label is {pos_name}.</p>'
            f'{notes}<div class="plots">{tags}</div>')


def read_trainer_log(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``run_dir/trainer_log.jsonl``; a truncated last line (run still writing) is skipped."""
    path = run_dir / "trainer_log.jsonl"
    if not run_dir.is_dir():
        raise VlmtuneError(f"{run_dir}: --run_dir is not a directory")
    if not path.is_file():
        raise VlmtuneError(f"{path}: not found (--run_dir must be a training output_dir)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise VlmtuneError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have a finite number under ``key``."""
    xs, ys = [], []
    for row in rows:
        step, value = row.get("step", row.get("current_steps")), row.get(key)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(float(step))
            ys.append(float(value))
    return xs, ys


def training_html(run_dir: Path) -> str:
    """Loss curves (train and eval), eval task metrics and learning rate against the step."""
    rows = read_trainer_log(run_dir)
    imgs = []
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, style, label=key)
    if ax.lines:
        ax.set(xlabel="step", ylabel="loss", title="Loss")
        ax.grid(alpha=0.3)
        ax.legend()
        imgs.append(png_data_url(fig))

    keys = sorted({k for row in rows for k in row
                   if k.startswith("eval_") and k not in NOT_METRICS and k.isascii()})
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for key in keys:
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, "o-", label=key)
    if ax.lines:
        ax.set(xlabel="step", ylabel="value", title="Eval metrics")
        ax.grid(alpha=0.3)
        ax.legend()
        imgs.append(png_data_url(fig))

    xs, ys = _series(rows, "learning_rate")
    if xs:
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        ax.plot(xs, ys)
        ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
        ax.grid(alpha=0.3)
        imgs.append(png_data_url(fig))

    body = "".join(f'<img alt="training curve" src="{u}">' for u in imgs) or \
        '<p class="note">trainer_log.jsonl has no loss or eval rows yet.</p>'
    return f'<h2 id="training">Training ({esc(run_dir)})</h2><div class="plots">{body}</div>'


def gallery_html(records: Sequence[dict[str, Any]], metrics: dict[str, Any], scores: list[float] | None,
                 base_dir: Path, max_gallery: int) -> str:
    """Cards of the misclassified examples, the most confident mistakes first when scores exist."""
    positive, labels = metrics["positive"], set(metrics["labels"])
    wrong = [i for i, r in enumerate(records) if r["predict"].strip() != r["label"].strip()]
    if scores is not None:
        # How strongly the model believed the wrong side: P(positive) for a negative, 1 - it for a positive.
        wrong.sort(key=lambda i: -(scores[i] if records[i]["label"].strip() != positive else 1 - scores[i]))
    shown = wrong[:max_gallery]
    cache: dict[Path, str | None] = {}
    cards = []
    for i in shown:
        r = records[i]
        pictures = []
        for image in r["images"]:
            path = Path(image) if Path(image).is_absolute() else base_dir / image
            if path not in cache:
                cache[path] = thumbnail(path) if path.is_file() else None
            if cache[path]:
                pictures.append(f'<img alt="{esc(image)}" src="{cache[path]}">')
            else:
                why = "image not found" if not path.is_file() else "cannot read image"
                pictures.append(f'<div class="missing">{why}: {esc(image)}</div>')
        answer = r["predict"].strip()
        invalid = "" if answer in labels else ' <span class="bad">(invalid answer)</span>'
        score_text = ""
        if "scores" in r:
            score_text = "<br>scores: " + ", ".join(f"{esc(k)}: {float(v):.4f}" for k, v in r["scores"].items())
        prompt = r.get("prompt") or ""
        cards.append(
            f'<div class="card">{"".join(pictures) or "<div class=missing>no image</div>"}'
            f'<b>id:</b> {esc(r["id"])} <span class="note">(line {r["_line"]})</span><br>'
            f'<b>label:</b> {esc(r["label"])}<br><b>answer:</b> <span class="bad">{esc(json.dumps(r["predict"], ensure_ascii=False))}'
            f'</span>{invalid}{score_text}'
            f'<details><summary>rules / prompt</summary><pre>{esc(prompt)}</pre></details></div>')
    more = f" (showing the first {len(shown)}, see --max_gallery)" if len(shown) < len(wrong) else ""
    order = "most confident mistakes first" if scores is not None else "in file order"
    return (f'<h2 id="gallery">Misclassified: {len(wrong)} of {len(records)}{more}</h2>'
            f'<p class="note">{order}</p><div class="gallery">{"".join(cards)}</div>')


def build_report(records: Sequence[dict[str, Any]], metrics: dict[str, Any], source: Path,
                 run_dir: Path | None = None, max_gallery: int = 200) -> str:
    """The whole HTML page for loaded ``records`` of ``source`` and their ``metrics``."""
    scores = positive_scores_of(records, metrics["positive"], source)
    parts = [metrics_html(metrics), confusion_html(metrics)]
    if scores is not None:
        parts.append(score_plots_html(records, metrics, scores))
    if run_dir is not None:
        parts.append(training_html(run_dir))
    parts.append(gallery_html(records, metrics, scores, source.parent, max_gallery))
    title = f"vlmtune report: {source.name}"
    return (f'<!DOCTYPE html><html lang="zh"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p class="note">{esc(source)}</p>'
            f'{"".join(parts)}</body></html>\n')


def write_report(path: str | Path, out: str | Path | None = None, run_dir: str | Path | None = None,
                 max_gallery: int = 200, positive: str | None = None, label_set: Sequence[str] | None = None) -> Path:
    """The HTML report of a predictions JSONL written to `out` (default: report.html next to it), with the loss and
    metric curves of `run_dir` (a training output_dir) when given; never over one of the files it reads."""
    if max_gallery < 0:
        raise VlmtuneError(f"--max_gallery must be >= 0, got {max_gallery}")
    path = Path(path)
    target = Path(out) if out else path.parent / "report.html"
    run_dir = Path(run_dir) if run_dir else None
    setting = "--out" if out else "report file"
    inputs = [path] + ([p for p in run_dir.iterdir() if p.is_file()] if run_dir and run_dir.is_dir() else [])
    refuse_input_as_output(target, inputs, setting)
    records = load_predictions(path)
    images = [Path(i) if Path(i).is_absolute() else path.parent / i for r in records for i in r["images"]]
    refuse_input_as_output(target, images, setting)  # the gallery reads them
    metrics = metrics_of_file(records, path, positive=positive or POSITIVE, label_set=label_set)
    page = build_report(records, metrics, path, run_dir=run_dir, max_gallery=max_gallery)
    write_atomic(target, page)
    return target
