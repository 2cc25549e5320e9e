"""Prediction throughput on a fixed CPU configuration: label scoring vs generation, batch 1 and 8.

The configuration of the reference measurement (LLaMA-Factory 0.9.5 on these machines, generate,
batch 1: 0.093 s per sample): a tiny Qwen2.5-VL (text hidden 128, 2 layers; vision depth 2, hidden
64), 448×448 images (256 image tokens), a rules prompt, fp32, 2 torch threads. Here: 64 samples.

A random tiny model generates noise until max_new_tokens, which would time the wrong thing; so the
script first trains a LoRA adapter for a few dozen steps (plain AdamW) to answer 满足要求 / 不满足要求
according to the rule its prompt states. Generation then stops at `<|im_end|>` after the label, as a
fine-tuned model does, and both labels occur — so the check that score mode and generate mode
predict the same label wherever generation gave a valid label is not trivial.

    python benchmarks/predict_throughput.py [--samples 64] [--threads 2] [--arch qwen3_vl] [--library]

`--arch` picks the family of the tiny model (default qwen2_5_vl, the reference's); `--library` turns
vlmtune's fast paths off (the vision encoder, the last-layer trick, the rope shortcut), so that the
model runs transformers' own code end to end — the fallback every unproven architecture takes.

Prints seconds per sample and samples/s for each mode and batch size, timing the loop `vlmtune predict`
runs (image decoding one batch ahead in a helper thread, encoding, the model; not model loading or
the JSONL; the adapter merged, as `vlmtune predict` loads it), median of --repeats runs, the
speed-up over the reference, and the agreement check. Also times the naive way of scoring (one full
forward per label) and the vision tower alone. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

TRAIN_PIXELS = 112 * 112
REFERENCE_S_PER_SAMPLE = 0.093  # LLaMA-Factory 0.9.5, generate, batch 1, same model and images
POS, NEG = "满足要求", "不满足要求"
RULES = ["画面中只允许出现立方体、圆柱体、圆环、五角星徽章和灯。", "每个五角星徽章必须位于圆环内。",
         "灯必须位于画面左上角。", "右下角水印标注的数字必须等于立方体数量。", "圆柱体数量必须等于圆环数量之和。",
         "每个圆环内必须有一个五角星徽章。"]
RULE_OK, RULE_BAD = "所有物体必须位于地面上。", "画面中没有其他物体。"


def write_dataset(directory: Path, n: int, size: int) -> None:
    import json

    import numpy as np
    from PIL import Image

    (directory / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(directory / "images" / f"{i}.jpg",
                                                                                    quality=90)
        rules = RULES + [RULE_OK if i % 2 == 0 else RULE_BAD]
        prompt = ("<image>判断以上图片是否满足要求:\n" + "\n".join(f"{k + 1}. {r}" for k, r in enumerate(rules))
                  + '\n请只输出如下格式:"满足要求", 或 "不满足要求"。')
        records.append({"messages": [{"role": "system", "content": "你是一个商品陈列合规检查助手。"},
                                     {"role": "user", "content": prompt},
                                     {"role": "assistant", "content": POS if i % 2 == 0 else NEG}],
                        "images": [f"images/{i}.jpg"]})
    (directory / "bench.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    entry = {"file_name": "bench.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                      "system_tag": "system"}}
    (directory / "dataset_info.json").write_text(json.dumps({"bench": entry}), encoding="utf-8")


def train_adapter(model_dir: Path, conversations, out: Path, steps: int) -> None:
    """LoRA r=8 on the language model (+ lm_head) fitted to the answers, saved with its processor."""
    import torch

    from vlmtune.config import FinetuneConfig
    from vlmtune.data.encode import Collator, encode
    from vlmtune.data.processor import load_processor
    from vlmtune.model.adapters import apply_finetuning
    from vlmtune.model.load import load_model

    torch.manual_seed(0)
    # Trained on small images (16 image tokens): the answer follows the prompt's rule, and training at
    # 448² would cost minutes. Prediction passes its own image_max_pixels (448²).
    processor = load_processor(model_dir, max_pixels=TRAIN_PIXELS)
    samples = [encode(c, processor, None) for c in conversations]
    model = apply_finetuning(load_model(model_dir), FinetuneConfig(lora_rank=8, lora_alpha=16,
                                                                   additional_target="lm_head"),
                             log=lambda *_: None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    collate, rng = Collator(processor), random.Random(0)
    model.train()
    for _ in range(steps):
        batch = collate(rng.sample(samples, 8))
        model(**batch.model_inputs(), labels=batch.labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    processor.save_pretrained(out)


def timed(fn, n: int, repeats: int) -> float:
    """Median of `repeats` runs, in seconds per sample."""
    import statistics

    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train_steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="time each configuration this often, keep the median")
    from vlmtune.families import MODEL_TYPES, TINY_DEFAULT

    parser.add_argument("--arch", default=TINY_DEFAULT, choices=MODEL_TYPES, help="the tiny model's family (model type)")
    parser.add_argument("--library", action="store_true", help="transformers' own code: vlmtune's fast paths off")
    args = parser.parse_args()
    if args.library:
        from vlmtune.infer import last_positions, scoring
        from vlmtune.model import vision

        vision.SUPPORTED, last_positions.SUPPORTED, scoring.FAST_POSITIONS = (), (), ()

    from vlmtune import allocator

    allocator.for_prediction()  # as `vlmtune predict` starts
    import torch

    torch.set_num_threads(args.threads)
    from vlmtune.data.encode import image_tokens, load_images
    from vlmtune.data.loader import load_datasets
    from vlmtune.infer.engine import load_engine
    from vlmtune.infer.runner import TransformersPredictor, predict_batches
    from vlmtune.model.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "tiny", max_pixels=args.image_size ** 2, arch=args.arch)
        write_dataset(tmp / "data", args.samples, args.image_size)
        convs = load_datasets("bench", str(tmp / "data"), None).conversations
        started = time.perf_counter()
        train_adapter(model_dir, convs, tmp / "adapter", args.train_steps)
        print(f"adapter trained in {time.perf_counter() - started:.1f} s ({args.train_steps} steps of batch 8)")
        engine = load_engine(str(model_dir), str(tmp / "adapter"), image_max_pixels=args.image_size ** 2,
                             merge_adapter=True, log=print)  # as `vlmtune predict` loads it
        model, processor = engine.model, engine.processor
        n = len(convs)
        n_image_tokens = image_tokens(load_images(convs[0], processor), processor)[0]
        print(f"{args.arch}{' (library path)' if args.library else ''}: {n} samples, {args.image_size}x"
              f"{args.image_size} images ({n_image_tokens} image tokens), {args.threads} threads, fp32\n")

        labels = [POS, NEG]
        predictor = TransformersPredictor(engine)  # what `vlmtune predict` runs, minus the JSONL writing

        def run(mode: str, batch: int) -> list[str]:
            rows = [row for _, part in predict_batches(predictor, convs, mode, labels, batch, max_new_tokens=16)
                    for row in part]
            return [row["predict"] for row in rows]

        results, outputs = {}, {}
        run("score", 2)  # warm-up
        for batch in (1, 8):
            for mode in ("score", "generate"):
                def once(mode=mode, batch=batch):
                    outputs[(mode, batch)] = run(mode, batch)
                results[(mode, batch)] = timed(once, n, args.repeats)

        naive = timed(lambda: naive_scores(model, processor, convs, labels), n, 1)
        vision = timed(vision_only(model, processor, convs), n, args.repeats)
        vision_library = timed(vision_only(model, processor, convs, library=True), n, args.repeats)

        print(f"{'mode':<10} {'batch':>5} {'s/sample':>9} {'samples/s':>10} {'vs LLaMA-Factory':>17}")
        for (mode, batch), seconds in results.items():
            print(f"{mode:<10} {batch:>5} {seconds:>9.4f} {1 / seconds:>10.1f} "
                  f"{REFERENCE_S_PER_SAMPLE / seconds:>16.1f}x")
        print(f"{'score*':<10} {1:>5} {naive:>9.4f} {1 / naive:>10.1f} {REFERENCE_S_PER_SAMPLE / naive:>16.1f}x"
              f"   (* naive: one full forward per label, for comparison)")
        print(f"reference: LLaMA-Factory 0.9.5 generate, batch 1: {REFERENCE_S_PER_SAMPLE} s/sample")
        print(f"of which the vision tower alone (batch 8): {vision:.4f} s/sample "
              f"({vision / results[('score', 8)]:.0%} of score mode at batch 8); transformers' own forward of "
              f"the same tower: {vision_library:.4f} s/sample")
        print(f"load average during the run: {os.getloadavg()[0]:.2f} (1 min); numbers are only comparable on a "
              f"quiet machine")

        scored = outputs[("score", 8)]
        for batch in (1, 8):
            generated = outputs[("generate", batch)]
            valid = [(g, s) for g, s in zip(generated, scored) if g in labels]
            agree = sum(g == s for g, s in valid)
            print(f"\nagreement (generate batch {batch} vs score): {len(valid)}/{n} generations are a valid label; "
                  f"score mode predicts the same label on {agree}/{len(valid)}"
                  + ("" if agree == len(valid) else "  <-- MISMATCH"))
        counts = {label: scored.count(label) for label in labels}
        truth = sum(s == c.answer for s, c in zip(scored, convs))
        print(f"score-mode predictions: {counts}; {truth}/{n} equal the reference answer")


def vision_only(model, processor, conversations, batch_size: int = 8, library: bool = False):
    """A function running just the vision tower on the (already prepared) images: the part of every
    mode that no mode can skip. As prediction runs it (`model.vision.VisionEncoder` on the
    resized images), or with `library=True` as transformers' `visual(pixel_values, grid_thw)`."""
    import torch

    from vlmtune.data.encode import Collator
    from vlmtune.infer.scoring import encode_prompts, unwrap
    from vlmtune.model.vision import vision_encoder

    visual = unwrap(model).model.visual
    encoder = vision_encoder(visual)
    collate = Collator(processor, padding_side="right", raw_images=not library)
    batches = [collate(encode_prompts(conversations[i:i + batch_size], processor))
               for i in range(0, len(conversations), batch_size)]

    def run() -> None:
        with torch.no_grad():
            for batch in batches:
                if library:
                    visual(batch.pixel_values, grid_thw=batch.image_grid_thw)
                else:
                    encoder.still_images(batch.image_pixels, batch.image_grid_thw, batch.image_settings)
    return run


def naive_scores(model, processor, conversations, labels):
    """The textbook way: for every sample and label, one forward of prompt + label (batch 1)."""
    from dataclasses import replace

    import torch

    from vlmtune.data.conversation import Message
    from vlmtune.data.encode import IGNORE_INDEX, Collator, encode, load_images

    collate = Collator(processor)
    with torch.no_grad():
        for conv in conversations:
            images = load_images(conv, processor)
            for label in labels:
                c = replace(conv, messages=list(conv.messages[:-1]) + [Message("assistant", label)])
                batch = collate([encode(c, processor, None, images=images)])
                target = batch.labels[0, 1:]
                logp = model(**batch.model_inputs()).logits[0, :-1].float().log_softmax(-1)
                keep = target != IGNORE_INDEX
                logp[keep].gather(-1, target[keep][:, None]).sum()


if __name__ == "__main__":
    main()
