"""Stage 1 of the demo: pretrain a tiny Qwen2.5-VL to *see* synthetic scenes (the shipped base model).

    python -m vlmtune.demo.pretrain --out src/vlmtune/assets/demo_base          # what ships
    python -m vlmtune.demo.pretrain --out /tmp/base --vision_steps 200 --caption_steps 200 --n_scenes 800

Why a pretrained base. The demo must show LoRA fine-tuning taking a model from chance to ≥ 0.9 on the
compliance rules in a few CPU minutes, as the user's LoRA run does on Qwen2.5-VL. A random tiny model
cannot do that: one bit per sample is far too little signal to teach a vision tower to see. Real users
start from a model that already sees; so does the demo. It is built the way vision-language models are:

1. **Vision encoder** (like the CLIP/ViT a real VLM starts from): the tiny model's vision tower and
   projector learn, for each of the 64 image tokens of a 224×224 scene, which object is centred in
   its 28×28 region (nothing, cube, cylinder, ring with a star, empty ring, lone star, lamp, sphere,
   cone, pyramid) — a cross-entropy head on the projector output, dropped afterwards. Dense labels
   are what make this fast: trained through captions alone (2,000 steps, an earlier version of this
   script) the tower never learned to tell a sphere from a cylinder (probe at the majority rate).
2. **Alignment** (`vlmtune train`, full fine-tuning of the language model, vision frozen with its
   features cached): 85 % caption records, user `<image>描述图中的物体。` → `describe(scene)`, the
   number of foreign objects and lone stars, then the count of every kind and the lamp's row; 15 %
   text-only records teaching the answer words (a "检查结果:合格" style prompt → 满足要求, "不合格" →
   不满足要求; no image, nothing about any rule).

Scenes are `vlmtune synth` scenes at 224×224 drawn from the easy preset's distribution (foreign
objects and stars outside rings common), on seeds the demo never uses. Stage 2 (`vlmtune demo`) is
then ordinary LoRA on the language model only, vision frozen.

Two traps, both measured (DESIGN.md §5):

- The answer words must be *targets* in stage 1. Output rows of tokens that are never predicted
  collapse together while the model trains, and LoRA (which leaves lm_head and the embeddings
  alone) cannot pull 满足要求 and 不满足要求 apart again: the label loss stays near 10 nats and the
  accuracy at 0.50, silently. The Q&A records are what prevents that.
- Stage 1 must contain no yes/no judgement of an image. Put the rules into it and the "before"
  accuracy on the demo's rules drifts away from chance, so the before/after comparison would no
  longer show what LoRA learned.

Budgeted in steps, not seconds (other processes slow wall time 2-3x); deterministic for a given
seed and thread count. The output directory holds only what a model directory needs (config,
safetensors, tokenizer, preprocessor, chat template) plus `pretrain.json`, the recipe it came from.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from vlmtune.errors import VlmtuneError
from vlmtune.families import family_of_dir

IMAGE_SIZE = 224  # 224×224 → 64 image tokens (patch 14, merge 2)
MAX_PIXELS = IMAGE_SIZE * IMAGE_SIZE
CAPTION_PROMPT = "<image>描述图中的物体。"
ANSWER_FORMAT = '请只输出如下格式:"满足要求", 或 "不满足要求"。'
# Text-only prompts for the answer words: {verdict} is 合格 or 不合格. No image and no rule in any of them.
QA_TEMPLATES = (
    "检查结果:{verdict}。" + ANSWER_FORMAT,
    "该商品陈列的检查结论为{verdict}。" + ANSWER_FORMAT,
    "结论:{verdict}\n" + ANSWER_FORMAT,
    "如果检查{verdict},请回答。" + ANSWER_FORMAT,
)
VERDICTS = {"合格": "满足要求", "不合格": "不满足要求"}
# Files that make up the shipped model directory.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
# Scene mix: rules 1 and 2 broken often, so foreign objects and stars outside rings (the rare things the
# demo's rules are about) are common: each in about 60 % of the scenes instead of 30 %.
BREAK_PROB, EXTRA_BREAK = 0.8, 0.5
# Seeds of the synthetic scenes used here; the demo and its tests use small seeds (0-99).
SCENE_SEED = 1000
# Vision tower width. The tiny default (64, probed with a per-class sigmoid loss) still never found a
# sphere, cone or pyramid after 600 dense steps; width 128 with the cross-entropy used here found about
# half of them after 200 (measured; the two changes were not separated).
VISION_HIDDEN = 128

# What stage 1a teaches each image token: the object centred in its 28×28 region (index 0: nothing).
REGION_CLASSES = ("无", "立方体", "圆柱体", "圆环+五角星", "圆环", "五角星", "台灯", "球体", "圆锥", "金字塔")
_REGION_OF_KIND = {"cube": 1, "cylinder": 2, "star": 5, "lamp": 6, "sphere": 7, "cone": 8, "pyramid": 9}
MERGED_PATCH = 28  # pixels per side of one image token (patch 14 × spatial merge 2)


def region_classes(truth: dict) -> list[int]:
    """Per image token, row-major over the (size/28)² grid: the REGION_CLASSES index of the object whose
    bounding-box centre falls in that token's region (a star inside a ring is part of its ring)."""
    grid = truth["size"] // MERGED_PATCH
    objects = truth["objects"]
    full_rings = {o["ring"] for o in objects if o["kind"] == "star" and o.get("ring") is not None}
    classes = [0] * (grid * grid)
    for i, o in enumerate(objects):
        if o["kind"] == "star" and o.get("ring") is not None:
            continue
        x0, y0, x1, y1 = o["bbox"]
        row = min(grid - 1, int((y0 + y1) / 2 / MERGED_PATCH))
        col = min(grid - 1, int((x0 + x1) / 2 / MERGED_PATCH))
        classes[row * grid + col] = (3 if i in full_rings else 4) if o["kind"] == "ring" else _REGION_OF_KIND[o["kind"]]
    return classes


def describe(truth: dict) -> str:
    """What the base model learns to say about a scene: first how many foreign objects and lone stars
    there are (so the language model learns to find them from the first answer token on, where a
    judgement is made), then `synth.caption`'s counts. E.g. `其他物体1 环外五角星0。立方体2 圆柱体1 ...`"""
    objects = truth["objects"]
    lone_stars = sum(1 for o in objects if o["kind"] == "star" and o.get("ring") is None)
    return f"其他物体{truth['foreign']} 环外五角星{lone_stars}。{truth['caption']}"


def write_scenes(data_dir: Path, n_scenes: int, seed: int) -> list[dict]:
    """Synthesise the pretraining scenes; returns their truth records (synth's sidecar)."""
    from vlmtune.synth import generate

    generate(n_scenes, data_dir, seed=SCENE_SEED + seed, preset="easy", name="scenes", image_size=IMAGE_SIZE,
             break_prob=BREAK_PROB, extra_break=EXTRA_BREAK)
    return [json.loads(line) for line in (data_dir / "scenes.truth.jsonl").read_text(encoding="utf-8").splitlines()]


def write_caption_dataset(data_dir: Path, truths: list[dict], qa_fraction: float, seed: int) -> dict[str, int]:
    """`pretrain.json` (captions + text-only Q&A) with its dataset_info entry, for stage 1b."""
    from vlmtune.synth import SYSTEM_PROMPT

    system = {"role": "system", "content": SYSTEM_PROMPT}
    records = [{"messages": [system, {"role": "user", "content": CAPTION_PROMPT},
                             {"role": "assistant", "content": describe(t)}],
                "images": [t["image"]]} for t in truths]
    rng = random.Random(f"vlmtune.demo.pretrain/{seed}")
    n_qa = round(len(truths) * qa_fraction / (1 - qa_fraction))
    for i in range(n_qa):
        verdict = ("合格", "不合格")[i % 2]  # balanced
        prompt = rng.choice(QA_TEMPLATES).format(verdict=verdict)
        records.append({"messages": [system, {"role": "user", "content": prompt},
                                     {"role": "assistant", "content": VERDICTS[verdict]}]})
    rng.shuffle(records)
    (data_dir / "pretrain.json").write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    info = json.loads((data_dir / "dataset_info.json").read_text(encoding="utf-8"))
    info["pretrain"] = dict(info["scenes"], file_name="pretrain.json")
    (data_dir / "dataset_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    return {"captions": len(truths), "qa": n_qa}


def pretrain_vision(model_dir: Path, data_dir: Path, truths: list[dict], out_dir: Path, steps: int,
                    batch_size: int, learning_rate: float, seed: int, log=print) -> dict:
    """Stage 1a: train the vision tower and projector of `model_dir` on dense region labels; write the
    whole model (language model untouched) to `out_dir`. Returns held-out token accuracies."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from vlmtune.data.images import load_resized, to_patches
    from vlmtune.data.processor import load_processor
    from vlmtune.model.load import load_model

    torch.manual_seed(seed)
    model = load_model(model_dir)
    image_processor = load_processor(model_dir).image_processor
    vision = model.model.visual
    images = [load_resized(data_dir / t["image"], image_processor) for t in truths]
    targets = torch.tensor([region_classes(t) for t in truths])
    held_out = max(1, len(truths) // 20)  # the last 5 %: measured, never trained on
    head = torch.nn.Linear(model.config.vision_config.out_hidden_size, len(REGION_CLASSES))
    params = list(vision.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    order = torch.Generator().manual_seed(seed)

    def token_logits(indices: list[int]) -> torch.Tensor:
        pixels, grids = to_patches([images[i] for i in indices], image_processor)
        features = vision(pixels, grid_thw=grids).pooler_output  # (images × tokens, hidden), row-major per image
        return head(features).view(len(indices), -1, len(REGION_CLASSES))

    def accuracy() -> dict:
        with torch.no_grad():
            indices = list(range(len(truths) - held_out, len(truths)))
            predicted = torch.cat([token_logits(indices[i:i + 64]).argmax(-1) for i in range(0, len(indices), 64)])
        truth = targets[indices]
        objects = truth > 0
        return {"object_token_accuracy": round((predicted[objects] == truth[objects]).float().mean().item(), 4),
                "empty_token_accuracy": round((predicted[~objects] == 0).float().mean().item(), 4)}

    started = time.perf_counter()
    vision.train()
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(truths) - held_out, (batch_size,), generator=order).tolist()
        loss = torch.nn.functional.cross_entropy(token_logits(batch).flatten(0, 1), targets[batch].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == steps:
            log(f"  vision step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    vision.eval()
    measured = accuracy()
    log(f"  vision tower on held-out scenes: {measured}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for path in model_dir.iterdir():  # tokenizer, processor, chat template: unchanged
        if path.is_file() and not (out_dir / path.name).exists():
            shutil.copyfile(path, out_dir / path.name)
    return measured


def train_config(model_dir: Path, data_dir: Path, output_dir: Path, steps: int, batch_size: int,
                 learning_rate: float, seed: int) -> dict:
    """The `vlmtune train` YAML of stage 1b: the language model fully trained on captions, vision frozen
    (its features computed once per image)."""
    return {
        "model_name_or_path": str(model_dir),
        "image_max_pixels": MAX_PIXELS,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        "freeze_vision_tower": True,
        "freeze_multi_modal_projector": True,
        "cache_image_features": True,
        "dataset": "pretrain",
        "dataset_dir": str(data_dir),
        "template": family_of_dir(model_dir).template_names[0],
        "cutoff_len": 1024,
        "preprocessing_num_workers": 2,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "logging_steps": 50,
        "save_strategy": "no",
        "plot_loss": True,
        "report_to": "none",
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": learning_rate,
        "max_steps": steps,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05,
        "max_grad_norm": 1.0,
        "bf16": False,
        "seed": seed,
        "val_size": 0,
        "eval_strategy": "no",
    }


def pretrain(out: str | Path, vision_steps: int = 1200, caption_steps: int = 800, batch_size: int = 16,
             vision_learning_rate: float = 2e-3, learning_rate: float = 1e-3, n_scenes: int = 4000,
             qa_fraction: float = 0.15, seed: int = 0, work_dir: str | Path | None = None, log=print) -> Path:
    """Build the stage-1 base model into `out` and return it."""
    from vlmtune.config import load_config
    from vlmtune.model.tiny import build_tiny_model
    from vlmtune.train.loop import train

    out = Path(out)
    if vision_steps < 1 or caption_steps < 1 or n_scenes < 20 or not 0 <= qa_fraction < 1:
        raise VlmtuneError("pretrain: steps must be >= 1, n_scenes >= 20 and qa_fraction in [0, 1)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlmtune-pretrain-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        init_dir = build_tiny_model(work / "init", seed=seed, max_pixels=MAX_PIXELS, vision_hidden=VISION_HIDDEN)
        truths = write_scenes(work / "data", n_scenes, seed)
        log(f"stage 1a: vision tower on dense region labels, {n_scenes} scenes ({time.perf_counter() - started:.0f} s)")
        vision = pretrain_vision(init_dir, work / "data", truths, work / "vision", vision_steps, batch_size,
                                 vision_learning_rate, seed, log)
        counts = write_caption_dataset(work / "data", truths, qa_fraction, seed)
        log(f"stage 1b: {counts['captions']} scene captions + {counts['qa']} text-only answer-word records "
            f"({time.perf_counter() - started:.0f} s)")
        config = train_config(work / "vision", work / "data", work / "train", caption_steps, batch_size,
                              learning_rate, seed)
        config_path = work / "pretrain.yaml"
        config_path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
        result = train(load_config(config_path))
        out.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            source = work / "train" / name
            if not source.is_file():
                source = work / "vision" / name  # chat template files: unchanged by training
            shutil.copyfile(source, out / name)
        took = time.perf_counter() - started
        recipe = {"built_by": "python -m vlmtune.demo.pretrain", "seed": seed, "vision_hidden": VISION_HIDDEN,
                  "vision_steps": vision_steps, "vision_learning_rate": vision_learning_rate, "vision_held_out": vision,
                  "caption_steps": caption_steps, "batch_size": batch_size, "learning_rate": learning_rate,
                  "n_scenes": n_scenes, "scene_seed": SCENE_SEED + seed, "image_size": IMAGE_SIZE, "records": counts,
                  "train_loss": round(result.get("train_loss", float("nan")), 4),
                  "final_loss": _final_loss(work / "train"),
                  "train_runtime_s": round(result.get("train_runtime", 0.0), 1), "total_s": round(took, 1)}
        (out / "pretrain.json").write_text(json.dumps(recipe, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    log(f"stage-1 base model written to {out} ({size:.1f} MB) in {took:.0f} s")
    return out


def _final_loss(run_dir: Path) -> float | None:
    """The last logged training loss of a run (trainer_log.jsonl)."""
    path = run_dir / "trainer_log.jsonl"
    if not path.is_file():
        return None
    losses = [row["loss"] for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if "loss" in row]
    return round(losses[-1], 4) if losses else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmtune.demo.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the base model into")
    parser.add_argument("--vision_steps", type=int, default=1200, help="stage 1a optimisation steps (default 1200)")
    parser.add_argument("--caption_steps", type=int, default=800, help="stage 1b optimisation steps (default 800)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--vision_learning_rate", type=float, default=2e-3)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="stage 1b learning rate")
    parser.add_argument("--n_scenes", type=int, default=4000, help="distinct synthetic scenes (default 4000)")
    parser.add_argument("--qa_fraction", type=float, default=0.15, help="share of text-only answer-word records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=None, help="keep the data and the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    try:
        pretrain(args.out, args.vision_steps, args.caption_steps, args.batch_size, args.vision_learning_rate,
                 args.learning_rate, args.n_scenes, args.qa_fraction, args.seed, args.work_dir)
    except VlmtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
