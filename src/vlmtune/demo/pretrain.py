"""Stage 1 of the demo: pretrain a tiny Qwen2.5-VL to *read* synthetic scenes (the shipped base model).

    python -m vlmtune.demo.pretrain --out src/vlmtune/assets/demo_base          # what ships (~10 min idle)
    python -m vlmtune.demo.pretrain --out /tmp/base --steps 200 --n_scenes 800  # a quick look

Why two stages. The demo must show LoRA fine-tuning taking a model from chance to ≥ 0.9 on the
compliance rules in a few CPU minutes, as the user's LoRA run does on Qwen2.5-VL. A random tiny model
cannot do that: trained on the yes/no answer directly it stays at 0.50 even after ten minutes (it
never fits the training set), because one bit per sample is far too little signal to teach a vision
tower to see. Real users start from a model that already sees; so does the demo. This script makes
one, with vlmtune's own pieces, the way vision-language models are pretrained — on descriptions:

- `vlmtune synth` scenes at 224×224 (64 image tokens), drawn from the easy preset's distribution
  (foreign objects and stars outside rings are common), on seeds the demo never uses;
- 85 % caption records: user `<image>描述图中的物体。`, assistant `synth.caption(scene)` — the count
  of each kind, stars inside rings, the lamp's row and the number of other objects, i.e. every
  quantity the rules depend on;
- 15 % text-only records teaching the answer words: a "检查结果:合格" style prompt → 满足要求,
  "不合格" → 不满足要求 (no image, nothing about any rule);
- `vlmtune train` with `finetuning_type: full`, vision tower and projector trained, from a fresh
  `build_tiny_model` (seeded), for a fixed number of steps.

Stage 2 (`vlmtune demo`) is then ordinary LoRA on the language model only, vision frozen.

Two traps, both measured (DESIGN.md §5):

- The answer words must be *targets* in stage 1. Output rows of tokens that are never predicted
  collapse together while the model trains, and LoRA (which leaves lm_head and the embeddings
  alone) cannot pull 满足要求 and 不满足要求 apart again: the label loss stays near 10 nats and the
  accuracy at 0.50, silently. The Q&A records are what prevents that.
- Stage 1 must contain no yes/no judgement of an image. Put other rules into it and the "before"
  accuracy on the demo's rules drifts away from chance (0.37-0.67 across checkpoints), so the
  before/after comparison would no longer show what LoRA learned.

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


# Names of the objects a description lists; the foreign kinds (rule 1) get their own names too.
OBJECT_NAMES = {"cube": "立方体", "cylinder": "圆柱体", "ring": "圆环", "star": "五角星", "lamp": "台灯",
                "sphere": "球体", "cone": "圆锥", "pyramid": "金字塔"}
RING_WITH_STAR = "圆环+五角星"
EMPTY = "无"
ROW_NAMES = {"back": "后排", "front": "前排"}


def describe(truth: dict) -> str:
    """What the base model learns to say about a scene: the content of every slot of the two rows,
    left to right, then `synth.caption`'s counts. E.g.
    `后排:无 立方体 圆环+五角星 无 台灯;前排:圆锥 无 五角星 圆柱体。立方体1 圆柱体1 ... 其他物体1`

    Why slots. Synth places objects in fixed slots (5 in the back row, 4 in the front row), so the
    n-th word of a row always describes the same strip of the image: every image region gets its
    own target (a foreign sphere or cone, a star on its own or in a ring, nothing), which the LM
    can learn to look up by position. Counts alone, or a left-to-right list of variable length,
    teach a vision tower this small too weakly (measured: after 2000-2500 steps "other objects"
    stayed at the majority-class rate).
    """
    from vlmtune.synth.scene import SLOTS

    size = truth["size"]
    objects = truth["objects"]
    in_ring = {o["ring"] for o in objects if o["kind"] == "star" and o.get("ring") is not None}
    rows = []
    for row in ("back", "front"):
        slots = [EMPTY] * SLOTS[row]
        for i, o in enumerate(objects):
            if o["position"] != row or (o["kind"] == "star" and o.get("ring") is not None):
                continue  # a star inside a ring is named with its ring
            x0, _, x1, _ = o["bbox"]
            slot = min(SLOTS[row] - 1, max(0, int((x0 + x1) / 2 / (size / SLOTS[row]))))
            slots[slot] = RING_WITH_STAR if o["kind"] == "ring" and i in in_ring else OBJECT_NAMES[o["kind"]]
        rows.append(f"{ROW_NAMES[row]}:{' '.join(slots)}")
    return ";".join(rows) + "。" + truth["caption"]


def write_dataset(data_dir: Path, n_scenes: int, qa_fraction: float, seed: int) -> dict[str, int]:
    """Synthesise the scenes and write `pretrain.json` (captions + Q&A) with its dataset_info entry."""
    from vlmtune.synth import SYSTEM_PROMPT, generate

    generate(n_scenes, data_dir, seed=SCENE_SEED + seed, preset="easy", name="scenes", image_size=IMAGE_SIZE,
             break_prob=BREAK_PROB, extra_break=EXTRA_BREAK)
    truths = [json.loads(line) for line in (data_dir / "scenes.truth.jsonl").read_text(encoding="utf-8").splitlines()]
    system = {"role": "system", "content": SYSTEM_PROMPT}
    records = [{"messages": [system, {"role": "user", "content": CAPTION_PROMPT},
                             {"role": "assistant", "content": describe(t)}],
                "images": [t["image"]]} for t in truths]
    rng = random.Random(f"vlmtune.demo.pretrain/{seed}")
    n_qa = round(n_scenes * qa_fraction / (1 - qa_fraction))
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
    return {"captions": n_scenes, "qa": n_qa}


def train_config(model_dir: Path, data_dir: Path, output_dir: Path, steps: int, batch_size: int,
                 learning_rate: float, seed: int) -> dict:
    """The `vlmtune train` YAML of stage 1: full training, vision tower and projector included."""
    return {
        "model_name_or_path": str(model_dir),
        "image_max_pixels": MAX_PIXELS,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        "freeze_vision_tower": False,
        "freeze_multi_modal_projector": False,
        "dataset": "pretrain",
        "dataset_dir": str(data_dir),
        "template": "qwen2_vl",
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


def pretrain(out: str | Path, steps: int = 2000, batch_size: int = 16, learning_rate: float = 1e-3,
             n_scenes: int = 4000, qa_fraction: float = 0.15, seed: int = 0, work_dir: str | Path | None = None,
             log=print) -> Path:
    """Build the stage-1 base model into `out` and return it."""
    from vlmtune.config import load_config
    from vlmtune.model.tiny import build_tiny_model
    from vlmtune.train.loop import train

    out = Path(out)
    if steps < 1 or n_scenes < 1 or not 0 <= qa_fraction < 1:
        raise VlmtuneError("pretrain: steps and n_scenes must be >= 1 and qa_fraction in [0, 1)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlmtune-pretrain-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        init_dir = build_tiny_model(work / "init", seed=seed, max_pixels=MAX_PIXELS)
        counts = write_dataset(work / "data", n_scenes, qa_fraction, seed)
        log(f"stage-1 data: {counts['captions']} scene captions + {counts['qa']} text-only answer-word records "
            f"({time.perf_counter() - started:.0f} s)")
        config = train_config(init_dir, work / "data", work / "train", steps, batch_size, learning_rate, seed)
        config_path = work / "pretrain.yaml"
        config_path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
        result = train(load_config(config_path))
        out.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            source = work / "train" / name
            if not source.is_file():
                source = init_dir / name  # chat template files: unchanged by training
            shutil.copyfile(source, out / name)
        took = time.perf_counter() - started
        recipe = {"built_by": "python -m vlmtune.demo.pretrain", "seed": seed, "steps": steps,
                  "batch_size": batch_size, "learning_rate": learning_rate, "n_scenes": n_scenes,
                  "scene_seed": SCENE_SEED + seed, "image_size": IMAGE_SIZE, "records": counts,
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
    parser.add_argument("--steps", type=int, default=2000, help="optimisation steps (default 2000)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--n_scenes", type=int, default=4000, help="distinct synthetic scenes (default 4000)")
    parser.add_argument("--qa_fraction", type=float, default=0.15, help="share of text-only answer-word records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=None, help="keep the data and the run here (default: a temp dir)")
    args = parser.parse_args(argv)
    try:
        pretrain(args.out, args.steps, args.batch_size, args.learning_rate, args.n_scenes, args.qa_fraction,
                 args.seed, args.work_dir)
    except VlmtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
