"""Training throughput on a fixed CPU configuration, as `vlmtune train` runs it.

The configuration of the reference measurement (LLaMA-Factory 0.9.5 on these machines: 14.4 samples/s,
peak RSS 939 MiB, 12 s from start to the first step): a tiny Qwen2.5-VL (text hidden 128, 2 layers;
vision depth 2, hidden 64), 96 ShareGPT samples with 448×448 images, batch 1, gradient accumulation 8,
2 epochs, val_size 0.1, LoRA r=8 on all language-model linears, fp32.

    python benchmarks/train_throughput.py [--repeat 3] [--threads 2] [--samples 96] [--image_size 448] [--arch qwen3_vl] [key=value ...]
    python benchmarks/train_throughput.py --text_hidden 1024 --text_layers 8 gradient_checkpointing=false  # larger

`--arch` picks the tiny model's family (default qwen2_5_vl, the reference's), with its default template;
`--text_hidden` / `--text_layers` make its language model larger (where activations, and so gradient
checkpointing, matter). `--model_dir` / `--dataset_dir` time a model and a dataset already on disk (the same ones
another tool is timed on; `--keep DIR` leaves the generated ones there for that). The medium model of
docs/benchmarks.md, where arithmetic dominates (≈150 M parameters, the user's 448² images → 256 image tokens):

    python benchmarks/train_throughput.py --text_hidden 768 --text_layers 12 --samples 24 --epochs 1 --keep /tmp/medium
    python benchmarks/train_throughput.py --model_dir /tmp/medium/model --dataset_dir /tmp/medium/data --samples 24 \
        --epochs 1 --batch 8 --accumulation 1 packing=true

Prints: train samples/s and tokens/s (from vlmtune's own log), peak RSS of the training process, the
time from process start to the end of the first optimisation step, and the load average around each
run. With --repeat N it prints every run and the medians. Run it on a quiet machine, or compare
variants interleaved in the same conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs; medians are printed when more than one")
    from vlmtune.families import MODEL_TYPES, TINY_DEFAULT

    parser.add_argument("--arch", default=TINY_DEFAULT, choices=MODEL_TYPES, help="the tiny model's family (model type)")
    parser.add_argument("--text_hidden", type=int, default=128, help="the language model's hidden size")
    parser.add_argument("--text_layers", type=int, default=2, help="the language model's decoder layers")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch", type=int, default=1, help="per_device_train_batch_size")
    parser.add_argument("--accumulation", type=int, default=8, help="gradient_accumulation_steps")
    parser.add_argument("--model_dir", help="time this model (a local directory) instead of building a tiny one")
    parser.add_argument("--dataset_dir", help="time this dataset (its dataset_info.json names 'bench') instead of "
                                              "generating one")
    parser.add_argument("--keep", help="write the generated model and dataset here (model/, data/) and keep them")
    parser.add_argument("overrides", nargs="*", help="key=value settings for the training YAML")
    args = parser.parse_args()

    from vlmtune.model.tiny import build_tiny_model
    from vlmtune.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kept = Path(args.keep) if args.keep else tmp
        model_dir = Path(args.model_dir) if args.model_dir else build_tiny_model(
            kept / "model", max_pixels=args.image_size ** 2, arch=args.arch, text_hidden=args.text_hidden,
            text_layers=args.text_layers)
        data_dir = Path(args.dataset_dir) if args.dataset_dir else kept / "data"
        if not args.dataset_dir:
            generate(args.samples, data_dir, seed=1, preset="easy", name="bench", image_size=args.image_size)
        cfg = {
            "model_name_or_path": str(model_dir), "dataset": "bench", "dataset_dir": str(data_dir),
            "max_samples": args.samples,
            "template": None, "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all",
            "image_max_pixels": args.image_size ** 2, "cutoff_len": 4096, "output_dir": str(tmp / "out"),
            "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": args.accumulation,
            "num_train_epochs": args.epochs,
            "learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "val_size": 0.1,
            "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
            "disable_tqdm": True, "bf16": False, "overwrite_output_dir": True,
        }
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        print(f"model: {model_dir if args.model_dir else args.arch}, {parameters(model_dir) / 1e6:.1f} M parameters"
              + ("" if args.model_dir else f", text hidden {args.text_hidden}, {args.text_layers} layers"))
        print(f"config: {args.samples} samples {args.image_size}x{args.image_size}, batch {args.batch} x accumulation "
              f"{args.accumulation}, {args.epochs:g} epochs, val_size 0.1, {args.threads} threads, OMP_WAIT_POLICY="
              f"{os.environ.get('OMP_WAIT_POLICY', 'unset (vlmtune picks PASSIVE when load >= cores)')} "
              f"{' '.join(args.overrides)}")
        runs = [run_once(tmp, args.threads, args.overrides) for _ in range(args.repeat)]
        for i, run in enumerate(runs, 1):
            print(f"run {i}: " + ", ".join(f"{k} {v}" for k, v in run.items()))
        median = {k: statistics.median(run[k] for run in runs) for k in runs[0] if k != "load"}
        print(("median of %d runs" % len(runs)) if len(runs) > 1 else "result")
        print(f"train samples/s:          {median['samples_per_s']:.1f}")
        print(f"train tokens/s:           {median['tokens_per_s']:.0f}")
        print(f"peak RSS (training proc): {median['peak_rss_mib']:.0f} MiB")
        print(f"start to first step:      {median['first_step_s']:.1f} s")
        print(f"wall time:                {median['wall_s']:.1f} s")
        print(f"load average (1 min):     {', '.join(run['load'] for run in runs)}")


def parameters(model_dir: Path) -> int:
    """The model's parameter count, from its safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count = 1
                for n in shape:
                    count *= n
                total += count
    return total


def run_once(tmp: Path, threads: int, overrides: list[str]) -> dict:
    """One `vlmtune train` in a fresh process; its numbers and the load average before → after."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    load_before = os.getloadavg()[0]
    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", "vlmtune", "train", str(tmp / "cfg.yaml"), *overrides],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_step, tail = None, []
    for line in process.stdout:
        tail = (tail + [line])[-40:]
        if first_step is None and line.startswith("[train step 1/"):
            first_step = time.time() - start
    _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if process.returncode != 0:
        raise SystemExit("".join(tail) + f"training failed with exit code {process.returncode}")
    peak_rss = usage.ru_maxrss / 1024  # Linux reports KiB
    results = json.loads((tmp / "out" / "train_results.json").read_text())
    rows = [json.loads(r) for r in (tmp / "out" / "trainer_log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_second" in r]
    return {"samples_per_s": results["train_samples_per_second"],
            "tokens_per_s": round(sum(r["tokens_per_second"] for r in rows) / len(rows)),
            "peak_rss_mib": round(peak_rss), "first_step_s": round(first_step, 2), "wall_s": round(wall, 1),
            "load": f"{load_before:.2f}→{os.getloadavg()[0]:.2f}"}


if __name__ == "__main__":
    main()
