"""Memory and start-up against the dataset's size: peak RSS and start → first step of `vlmtune train`.

The configuration of issue 15's reference (LLaMA-Factory 0.9.5 on these machines, 2026-11-29: peak RSS
1.02 GB, 137 s): the seed user's YAML (examples/qwen2_5vl_lora_sft.yaml) with CPU edits — the tiny
Qwen2.5-VL, bf16 off, 20 optimisation steps (val_size 0.1 as in the YAML: the final evaluation scores the
validation split), no checkpoints —, N ShareGPT records with
512×512 JPEGs (smooth random scenes, so the files are photo-sized rather than noise), image_max_pixels
262144 as in the seed YAML. Each size runs twice: first (the encoded-data store is built) and second
(`overwrite_cache: false`: the store is reused). Also `vlmtune data check` on many small images, and
the start-up of training on them (first and second run).

    python benchmarks/data_scale.py [--records 3000 12000] [--check_records 100000]

Prints per run: peak RSS of the training process, start → end of the first optimisation step, wall time.
Run it on a quiet machine; it writes its data under a temporary directory (≈ 70 MB per 1,000 records).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_records(directory: Path, n: int, size: int, start: int = 0) -> None:
    """n records with size×size JPEGs: a colour gradient and a few rectangles per image."""
    import numpy as np
    from PIL import Image, ImageDraw

    (directory / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:size, 0:size]
        base = np.stack([(x * rng.uniform(0.1, 0.5) + rng.integers(0, 80)) % 256,
                         (y * rng.uniform(0.1, 0.5) + rng.integers(0, 80)) % 256,
                         ((x + y) * 0.2 + rng.integers(0, 80)) % 256], axis=-1).astype(np.uint8)
        image = Image.fromarray(base)
        draw = ImageDraw.Draw(image)
        side = max(2, size // 8)
        for _ in range(4):
            x0, y0 = (int(v) for v in rng.integers(0, size - 2 * side, 2))
            draw.rectangle([x0, y0, x0 + int(rng.integers(side // 2, 2 * side)), y0 + int(rng.integers(side // 2, 2 * side))],
                           fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        image.save(directory / "images" / f"{i}.jpg", quality=85)
        answer = "满足要求" if i % 3 else "不满足要求"
        records.append({"messages": [
            {"role": "system", "content": "你是一个商品陈列合规检查助手。"},
            {"role": "user", "content": "<image>判断以上图片是否满足要求:\n1. 画面中只允许出现立方体、圆柱体、圆环、五角星徽章和灯。\n"
                                        "2. 每个五角星徽章必须位于圆环内。\n请只输出如下格式:\"满足要求\", 或 \"不满足要求\"。"},
            {"role": "assistant", "content": answer}], "images": [f"images/{i}.jpg"]})
    existing = json.loads((directory / "bench.json").read_text()) if (directory / "bench.json").exists() else []
    (directory / "bench.json").write_text(json.dumps(existing + records, ensure_ascii=False), encoding="utf-8")
    entry = {"file_name": "bench.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                      "system_tag": "system"}}
    (directory / "dataset_info.json").write_text(json.dumps({"bench": entry}), encoding="utf-8")


def train_once(cfg: Path, overrides: list[str], env: dict) -> dict:
    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", "vlmtune", "train", str(cfg), *overrides],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_step, tail, store = None, [], ""
    for line in process.stdout:
        tail = (tail + [line])[-40:]
        if "encoded-data store" in line or "encoded into the store" in line:
            store = line.strip()
        if first_step is None and line.startswith("[train step 1/"):
            first_step = time.time() - start
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("".join(tail) + "training failed")
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024), "first_step_s": round(first_step or -1, 1),
            "wall_s": round(time.time() - start, 1), "store": store}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[3000, 12000])
    parser.add_argument("--check_records", type=int, default=100000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from vlmtune.model.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "tiny")
        user = yaml.safe_load((REPO / "examples" / "qwen2_5vl_lora_sft.yaml").read_text(encoding="utf-8"))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), VLMTUNE_CACHE=str(tmp / "cache"))
        data, written = tmp / "data", 0
        for n in sorted(args.records):
            write_records(data, n - written, 512, start=written)
            written = n
            cfg = {**user, "model_name_or_path": str(model_dir), "dataset": "bench", "dataset_dir": str(data),
                   "output_dir": str(tmp / f"out-{n}"), "max_samples": n, "bf16": False, "max_steps": 20,
                   "save_strategy": "no", "report_to": "none",
                   "plot_loss": False, "overwrite_output_dir": True, "disable_tqdm": True, "logging_steps": 1}
            path = tmp / f"cfg-{n}.yaml"
            path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
            for name, overrides in (("first run", []), ("second run", ["overwrite_cache=false"])):
                result = train_once(path, overrides, env)
                print(f"{n:>6} records, {name:<10}: peak RSS {result['peak_rss_mib']} MiB, first step "
                      f"{result['first_step_s']} s, wall {result['wall_s']} s — {result['store'][:100]}", flush=True)
        if args.check_records:
            small = tmp / "small"
            write_records(small, args.check_records, 64)
            start = time.time()
            check = subprocess.Popen([sys.executable, "-m", "vlmtune", "data", "check", "--dataset", "bench",
                                      "--dataset_dir", str(small), "--model_name_or_path", str(model_dir)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            output = check.stdout.read()
            _, status, usage = os.wait4(check.pid, 0)
            print(f"data check of {args.check_records} records (64×64 images): {time.time() - start:.1f} s, peak RSS "
                  f"{usage.ru_maxrss // 1024} MiB, exit {os.waitstatus_to_exitcode(status)}; "
                  f"{' | '.join(output.splitlines()[1:3])}")
            # Start-up of training on the same 100,000 records (no validation split: the point is the start).
            cfg = {**cfg, "dataset_dir": str(small), "max_samples": args.check_records, "val_size": 0,
                   "output_dir": str(tmp / "out-small")}
            path = tmp / "cfg-small.yaml"
            path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
            for name, overrides in (("first run", []), ("second run", ["overwrite_cache=false"])):
                result = train_once(path, overrides, env)
                print(f"{args.check_records:>6} records (64×64, no validation), {name:<10}: peak RSS "
                      f"{result['peak_rss_mib']} MiB, first step {result['first_step_s']} s, wall {result['wall_s']} s",
                      flush=True)

if __name__ == "__main__":
    main()
