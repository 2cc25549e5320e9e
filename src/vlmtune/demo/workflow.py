"""The whole workflow on synthetic scenes and a tiny model, on a CPU: what `vlmtune demo [--out DIR]` runs.

    vlmtune demo                                  # -> demo_out/ (a few minutes on 2 cores)
    vlmtune demo --out /tmp/demo --steps 300 --n_train 1000 --n_test 200

What it does, each step with vlmtune's own code, as a user would on a real model:

1. copies the shipped base model (`vlmtune/assets/demo_base`: a tiny Qwen2.5-VL that vlmtune
   pretrained to describe synthetic scenes — see `vlmtune.demo.pretrain` for why and how) to DIR/base;
2. synthesises train / val / test scenes with the easy rules (`vlmtune synth --preset easy`, 224×224);
3. writes DIR/train_config.yaml, shaped like the user's LLaMA-Factory config (LoRA r=8 on every
   linear layer of the language model, cosine with warmup, eval and checkpoints every n steps, loss
   plots, TensorBoard, the best adapter by validation F1), and trains it (`vlmtune train`);
4. predicts the held-out test scenes in score mode (P(满足要求), P(不满足要求)) with the base model
   alone ("before") and with the trained adapter ("after") (`vlmtune predict --mode score`);
5. computes the metrics (`vlmtune eval`) and writes the HTML report (`vlmtune report --run_dir`);
6. prints accuracy before and after, where everything is, and the same commands for a real model.

Each step's full log goes to DIR/logs/; the terminal gets one line per step and the training bar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmtune.errors import VlmtuneError
from vlmtune.families import family_of_dir

BASE_ASSET = "assets/demo_base"
IMAGE_SIZE = 224  # what the base was pretrained on: 64 image tokens per scene
DEFAULT_OUT = "demo_out"
# Defaults: the learning run fits the 5-minute budget on 2 cores (see README "Demo" for timings).
DEFAULT_STEPS = 400
DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_TEST = 1600, 128, 400
BATCH_SIZE = 16
LEARNING_RATE = 2.0e-3
DATA_SEEDS = {"train": 1, "val": 2, "test": 3}  # the base model's pretraining scenes use seeds ≥ 1000


@dataclass
class DemoResult:
    out: Path
    before: dict  # metrics.json of the base model on the test set
    after: dict  # metrics.json of base + adapter on the test set
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step, and "total"
    report: Path | None = None


# ---------------------------------------------------------------------------------------------
# Steps


def shipped_base() -> Path:
    """The stage-1 base model inside the installed package."""
    from importlib.resources import files

    path = Path(str(files("vlmtune").joinpath(BASE_ASSET)))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise VlmtuneError(f"{path}: the demo base model is missing from the installed package; rebuild it with "
                           f"`python -m vlmtune.demo.pretrain --out {path}`")
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_base(out: Path) -> tuple[Path, bool]:
    """DIR/base: a copy of the shipped base, reused when identical. Returns (path, reused)."""
    source, target = shipped_base(), out / "base"
    same = target.is_dir() and all(
        (target / p.name).is_file() and _digest(target / p.name) == _digest(p) for p in source.iterdir() if p.is_file())
    if same:
        return target, True
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target, False


def make_data(data_dir: Path, n_train: int, n_val: int, n_test: int) -> tuple[dict[str, str], bool]:
    """Easy-preset scenes for train / val / test (dataset names -> split), reused when already there."""
    from vlmtune.synth import generate

    wanted = {"preset": "easy", "image_size": IMAGE_SIZE, "seeds": DATA_SEEDS,
              "n": {"train": n_train, "val": n_val, "test": n_test}}
    names = {split: f"demo_{split}" for split in DATA_SEEDS}
    stamp = data_dir / "demo_data.json"
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted and \
            all((data_dir / f"{name}.json").is_file() for name in names.values()):
        return names, True
    for split, name in names.items():
        generate(wanted["n"][split], data_dir, seed=DATA_SEEDS[split], preset="easy", name=name,
                 image_size=IMAGE_SIZE)
    stamp.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    return names, False


def train_config(out: Path, base: Path, names: dict[str, str], steps: int, eval_steps: int, seed: int) -> dict:
    """The demo's training YAML: the user's config (examples/qwen2_5vl_lora_sft.yaml), sized for a CPU."""
    return {
        "model_name_or_path": str(base),
        "image_max_pixels": IMAGE_SIZE * IMAGE_SIZE,
        "trust_remote_code": True,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_target": "all",
        "dataset": names["train"],
        "eval_dataset": names["val"],
        "dataset_dir": str(out / "data"),
        "template": family_of_dir(shipped_base()).template_names[0],  # what the base family's users write
        "cutoff_len": 1024,
        "overwrite_cache": True,
        "preprocessing_num_workers": 2,
        "dataloader_num_workers": 0,
        "output_dir": str(out / "run"),
        "logging_steps": 10,
        "save_steps": eval_steps,
        "save_total_limit": 2,
        "plot_loss": True,
        "overwrite_output_dir": True,
        "save_only_model": False,
        "report_to": "tensorboard",
        "per_device_train_batch_size": BATCH_SIZE,
        "gradient_accumulation_steps": 1,
        "learning_rate": LEARNING_RATE,
        "max_steps": steps,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "bf16": False,
        "seed": seed,
        "per_device_eval_batch_size": 32,
        "eval_strategy": "steps",
        "eval_steps": eval_steps,
        "metric_for_best_model": "f1",
        "load_best_model_at_end": True,
    }


def write_config(path: Path, config: dict) -> Path:
    header = (f"# Written by `vlmtune demo`; rerun the training alone with:\n#   vlmtune train {path}\n"
              "# The same keys as examples/qwen2_5vl_lora_sft.yaml (the user's LLaMA-Factory config), sized for a\n"
              "# tiny model on a CPU: batch 16 without accumulation, a higher learning rate, max_steps.\n")
    path.write_text(header + yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def predict(base: Path, adapter: Path | None, names: dict[str, str], data_dir: Path, save_name: Path) -> Path:
    """Score-mode predictions of the test scenes (what `vlmtune predict --mode score` writes)."""
    from vlmtune.config import build_config
    from vlmtune.infer.predict import PredictArgs
    from vlmtune.infer.predict import predict as predict_dataset

    values = {"model_name_or_path": str(base), "dataset": names["test"], "dataset_dir": str(data_dir)}
    if adapter is not None:
        values["adapter_name_or_path"] = str(adapter)
    pargs = PredictArgs(save_name=str(save_name), mode="score", batch_size=32, overwrite=True)
    return predict_dataset(build_config(values, "vlmtune demo"), pargs)


def evaluate(predictions: Path) -> dict:
    """The metrics `vlmtune eval` prints and saves (metrics.json next to the predictions)."""
    from vlmtune.evaluate.metrics import save_metrics
    from vlmtune.evaluate.table import format_table

    metrics, out = save_metrics(predictions, predictions.parent / "metrics.json")
    print(format_table(metrics))
    return json.loads(out.read_text(encoding="utf-8"))


def report(predictions: Path, run_dir: Path, out: Path) -> Path:
    """The HTML report `vlmtune report --run_dir` writes."""
    from vlmtune.evaluate.report import write_report

    return write_report(predictions, out, run_dir)


# ---------------------------------------------------------------------------------------------
# The run


@contextlib.contextmanager
def _logged(path: Path, keep_stderr: bool = False):
    """Send a step's output (prints; also stderr unless keep_stderr) to a log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), \
            (contextlib.nullcontext() if keep_stderr else contextlib.redirect_stderr(f)):
        yield


def run_demo(out: str | Path, steps: int = DEFAULT_STEPS, n_train: int = DEFAULT_TRAIN, n_val: int = DEFAULT_VAL,
             n_test: int = DEFAULT_TEST, eval_steps: int | None = None, seed: int = 42, log=print) -> DemoResult:
    """Base → synth → LoRA training → score-mode predictions before/after → metrics → report."""
    from vlmtune.config import load_config

    for flag, value, least in (("steps", steps, 1), ("n_train", n_train, 16), ("n_val", n_val, 2),
                               ("n_test", n_test, 2)):
        if value < least:
            raise VlmtuneError(f"--{flag} must be at least {least}, got {value}")
    eval_steps = eval_steps or max(1, steps // 4)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    _quiet_libraries()

    t = time.perf_counter()
    base, reused = copy_base(out)
    names, data_reused = make_data(out / "data", n_train, n_val, n_test)
    timings["data"] = time.perf_counter() - t
    log(f"[1/4] base model {base} ({'reused' if reused else 'copied from the package'}); scenes "
        f"{'reused' if data_reused else 'synthesised'}: {n_train} train, {n_val} val, {n_test} test "
        f"({timings['data']:.0f} s)")

    t = time.perf_counter()
    config_path = write_config(out / "train_config.yaml", train_config(out, base, names, steps, eval_steps, seed))
    with _logged(logs / "predict_before.log"):
        before_pred = predict(base, None, names, out / "data", out / "before" / "predictions.jsonl")
        before = evaluate(before_pred)
    timings["predict_before"] = time.perf_counter() - t
    log(f"[2/4] before fine-tuning: test accuracy {before['accuracy']:.3f} ({timings['predict_before']:.0f} s)")

    t = time.perf_counter()
    log(f"[3/4] training LoRA: {steps} steps of {BATCH_SIZE} (vlmtune train {config_path}; log: {logs / 'train.log'})")
    from vlmtune.train.loop import train

    with _logged(logs / "train.log", keep_stderr=True):
        train(load_config(config_path))
    timings["train"] = time.perf_counter() - t
    best = _best_eval(out / "run")
    log(f"      done in {timings['train']:.0f} s" + (f"; best validation F1 {best[1]:.3f} at step {best[0]}" if best else ""))

    t = time.perf_counter()
    with _logged(logs / "predict_after.log"):
        after_pred = predict(base, out / "run", names, out / "data", out / "after" / "predictions.jsonl")
        after = evaluate(after_pred)
        report_path = report(after_pred, out / "run", out / "report.html")
    timings["predict_after"] = time.perf_counter() - t
    log(f"[4/4] after fine-tuning: test accuracy {after['accuracy']:.3f}; report written "
        f"({timings['predict_after']:.0f} s)")
    timings["total"] = time.perf_counter() - started
    return DemoResult(out, before, after, timings, report_path)


def _best_eval(run_dir: Path) -> tuple[int, float] | None:
    path = run_dir / "all_results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    if "best_step" in results and "best_eval_f1" in results:
        return int(results["best_step"]), float(results["best_eval_f1"])
    return None


def _quiet_libraries() -> None:
    """No weight-loading / shard-writing progress bars from transformers in the demo's terminal."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def summary(result: DemoResult) -> str:
    import torch

    out, t = result.out, result.timings
    run = out / "run"
    plots = [name for name in ("training_loss.png", "training_eval_loss.png", "training_eval_accuracy.png")
             if (run / name).is_file()]
    more = len(list(run.glob("training_*.png"))) - len(plots)
    n = result.after["n"]
    lines = [
        "",
        f"vlmtune demo: done in {_duration(t['total'])} on {torch.get_num_threads()} CPU thread(s)",
        f"  held-out test accuracy ({n} scenes, easy rules):",
        f"    before fine-tuning (base model)  {result.before['accuracy']:.3f}",
        f"    after LoRA fine-tuning           {result.after['accuracy']:.3f}"
        f"   (F1 {result.after['f1']:.3f}, ROC-AUC {_fmt(result.after.get('roc_auc'))})",
        f"  time: data {t['data']:.0f} s · predict before {t['predict_before']:.0f} s · train {t['train']:.0f} s"
        f" · predict after + eval + report {t['predict_after']:.0f} s",
        "",
        f"  report    {result.report}",
        f"  adapter   {run}/adapter_model.safetensors (+ adapter_config.json)",
        f"  plots     {run}/{{{','.join(plots)}}}" + (f" and {more} more" if more else ""),
        f"  config    {out}/train_config.yaml · metrics {out}/after/metrics.json · TensorBoard: tensorboard "
        f"--logdir {run}/runs",
        "",
        "The same on a real Qwen2.5-VL with a GPU (your data registered in data/dataset_info.json):",
        "  vlmtune data check examples/qwen2_5vl_lora_sft.yaml",
        "  vlmtune train examples/qwen2_5vl_lora_sft.yaml",
        "  vlmtune predict --model_name_or_path /data/modelscope/Qwen2___5-VL-7B-Instruct "
        "--adapter_name_or_path /output/my_task --dataset my_test --dataset_dir data "
        "--save_name /output/my_task/test/predictions.jsonl",
        "  vlmtune report /output/my_task/test/predictions.jsonl --run_dir /output/my_task",
    ]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
