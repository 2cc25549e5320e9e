"""Training throughput on a fixed CPU configuration, as `vlmtune train` runs it.

The configuration of the reference measurement (LLaMA-Factory 0.9.5 on these machines: 14.4 samples/s,
peak RSS 939 MiB, 12 s from start to the first step): a tiny Qwen2.5-VL (text hidden 128, 2 layers;
vision depth 2, hidden 64), 96 ShareGPT samples with 448×448 images, batch 1, gradient accumulation 8,
2 epochs, val_size 0.1, LoRA r=8 on all language-model linears, fp32.

    python benchmarks/train_throughput.py [--samples 96] [--image_size 448]

Prints: train samples/s and tokens/s (from vlmtune's own log), peak RSS of the training process, and
the time from process start to the end of the first optimisation step. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    parser.add_argument("overrides", nargs="*", help="key=value settings for the training YAML")
    args = parser.parse_args()

    from vlmtune.model.tiny import build_tiny_model
    from vlmtune.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "tiny", max_pixels=args.image_size ** 2)
        generate(args.samples, tmp / "data", seed=1, preset="easy", name="bench", image_size=args.image_size)
        cfg = {
            "model_name_or_path": str(model_dir), "dataset": "bench", "dataset_dir": str(tmp / "data"),
            "template": "qwen2_vl", "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all",
            "image_max_pixels": args.image_size ** 2, "cutoff_len": 4096, "output_dir": str(tmp / "out"),
            "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "num_train_epochs": 2,
            "learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "val_size": 0.1,
            "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
            "disable_tqdm": True, "bf16": False,
        }
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        start = time.time()
        process = subprocess.Popen([sys.executable, "-m", "vlmtune", "train", str(tmp / "cfg.yaml"), *args.overrides],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        first_step = None
        for line in process.stdout:
            if first_step is None and line.startswith("[train step 1/"):
                first_step = time.time() - start
        process.wait()
        wall = time.time() - start
        if process.returncode != 0:
            raise SystemExit(f"training failed with exit code {process.returncode}")
        peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        results = json.loads((tmp / "out" / "train_results.json").read_text())
        rows = [json.loads(r) for r in (tmp / "out" / "trainer_log.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "tokens_per_second" in r]
        tokens_per_second = sum(r["tokens_per_second"] for r in rows) / len(rows)
        print(f"config: {args.samples} samples {args.image_size}x{args.image_size}, batch 1 x accumulation 8, "
              f"2 epochs, val_size 0.1, {args.threads} threads {' '.join(args.overrides)}")
        print(f"train samples/s:          {results['train_samples_per_second']:.1f}")
        print(f"train tokens/s:           {tokens_per_second:.0f}")
        print(f"peak RSS (training proc): {peak_rss_mib:.0f} MiB")
        print(f"start to first step:      {first_step:.1f} s")
        print(f"wall time:                {wall:.1f} s")


if __name__ == "__main__":
    main()
