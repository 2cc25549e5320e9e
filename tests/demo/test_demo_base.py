"""The shipped stage-1 base model and the pieces of `vlmtune demo` that run in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import REPO, assert_one_line_error, run_cli

from vlmtune.demo import pretrain
from vlmtune.demo.workflow import shipped_base, train_config


@pytest.fixture(scope="module")
def base() -> Path:
    return shipped_base()


def test_shipped_base_loads_with_the_ordinary_code_and_has_the_tiny_architecture(base):
    from vlmtune.data.processor import load_processor
    from vlmtune.model.load import load_model
    from vlmtune.model.tiny import build_tokenizer, tiny_config

    assert base == REPO / "src" / "vlmtune" / "assets" / "demo_base"  # the editable install reads the repo
    size_mb = sum(p.stat().st_size for p in base.iterdir()) / 2**20
    assert size_mb < 8, f"the shipped base should be a few MB, is {size_mb:.1f} MB"
    for name in pretrain.MODEL_FILES + ("pretrain.json",):
        assert (base / name).is_file(), name

    model = load_model(base)
    processor = load_processor(base)
    expected = tiny_config(build_tokenizer(), vision_hidden=pretrain.VISION_HIDDEN).to_dict()
    got = model.config.to_dict()
    assert got["model_type"] == "qwen2_5_vl"
    for part, keys in (("text_config", ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "rope_parameters")),
                       ("vision_config", ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                                          "spatial_merge_size", "fullatt_block_indexes", "out_hidden_size"))):
        for key in keys:
            assert got[part][key] == expected[part][key], (part, key)
    for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert got[key] == expected[key], key
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 3e6
    # the tokenizer is the tiny model's, and the images are sized as in pretraining: 224² -> 64 tokens
    assert processor.tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert processor.max_pixels == pretrain.MAX_PIXELS
    recipe = json.loads((base / "pretrain.json").read_text(encoding="utf-8"))
    assert recipe["built_by"] == "python -m vlmtune.demo.pretrain" and recipe["vision_hidden"] == pretrain.VISION_HIDDEN
    assert recipe["vision_steps"] >= 1000 and recipe["caption_steps"] >= 500


def _scenes(data_dir: Path, n: int, seed: int = 99) -> list[dict]:
    """Held-out easy-preset scenes (seeds the base never saw) and their truth records."""
    from vlmtune.synth import generate

    generate(n, data_dir, seed=seed, preset="easy", name="look", image_size=pretrain.IMAGE_SIZE)
    return [json.loads(line) for line in (data_dir / "look.truth.jsonl").read_text(encoding="utf-8").splitlines()]


def test_region_classes_put_each_object_in_the_token_under_its_centre(tmp_path):
    truths = _scenes(tmp_path, 40)
    grid = pretrain.IMAGE_SIZE // pretrain.MERGED_PATCH
    seen = set()
    for t in truths:
        classes = pretrain.region_classes(t)
        assert len(classes) == grid * grid
        expected = {}
        in_ring = {o["ring"] for o in t["objects"] if o["kind"] == "star" and o.get("ring") is not None}
        for i, o in enumerate(t["objects"]):
            x0, y0, x1, y1 = o["bbox"]
            token = int((y0 + y1) / 2 // 28) * grid + int((x0 + x1) / 2 // 28)
            if o["kind"] == "star" and o.get("ring") is not None:
                continue  # named with its ring
            name = {"cube": "立方体", "cylinder": "圆柱体", "star": "五角星", "lamp": "台灯", "sphere": "球体",
                    "cone": "圆锥", "pyramid": "金字塔"}.get(o["kind"]) or ("圆环+五角星" if i in in_ring else "圆环")
            expected[token] = name
        got = {token: pretrain.REGION_CLASSES[c] for token, c in enumerate(classes) if c}
        assert got == expected, t["id"]
        seen |= set(got.values())
    assert seen == set(pretrain.REGION_CLASSES[1:]), "40 scenes of the easy mix show every kind"


def test_describe_names_foreign_objects_and_lone_stars_first(tmp_path):
    for t in _scenes(tmp_path, 20):
        lone = sum(1 for o in t["objects"] if o["kind"] == "star" and not o["inside_ring"])
        assert pretrain.describe(t) == f"其他物体{t['foreign']} 环外五角星{lone}。{t['caption']}"


def test_shipped_base_sees_foreign_objects_and_lone_stars_in_held_out_scenes(base, tmp_path):
    """The base's captions of scenes it never saw: the two quantities the demo's rules depend on."""
    import re

    from vlmtune.data.conversation import Conversation, Message
    from vlmtune.data.processor import load_processor
    from vlmtune.infer.generation import generate_conversations
    from vlmtune.model.load import load_model
    from vlmtune.synth import SYSTEM_PROMPT

    truths = _scenes(tmp_path, 64)
    convs = [Conversation([Message("system", SYSTEM_PROMPT), Message("user", pretrain.CAPTION_PROMPT)],
                          [str(tmp_path / t["image"])], "look.json", i) for i, t in enumerate(truths)]
    answers = generate_conversations(load_model(base), load_processor(base), convs, batch_size=16, max_new_tokens=12)
    right = 0
    for t, answer in zip(truths, answers):
        found = re.match(r"其他物体(\d+) 环外五角星(\d+)", answer)
        assert found, answer
        lone = sum(1 for o in t["objects"] if o["kind"] == "star" and not o["inside_ring"])
        right += (int(found[1]) > 0) == (t["foreign"] > 0) and (int(found[2]) > 0) == (lone > 0)
    assert right / len(truths) >= 0.8, f"foreign object / lone star presence right in only {right}/{len(truths)}"


def test_demo_training_config_is_shaped_like_the_users(tmp_path):
    from vlmtune.config import build_config

    user = yaml.safe_load((REPO / "examples" / "qwen2_5vl_lora_sft.yaml").read_text(encoding="utf-8"))
    names = {"train": "demo_train", "val": "demo_val", "test": "demo_test"}
    demo = train_config(tmp_path, tmp_path / "base", names, steps=100, eval_steps=25, seed=1)
    # what the demo replaces: epochs by max_steps, val_size by a val set, and keys with no effect on a CPU
    replaced = {"num_train_epochs", "val_size", "video_max_pixels", "ddp_timeout", "max_samples",
                "resume_from_checkpoint"}
    assert set(user) - replaced <= set(demo)
    assert (demo["finetuning_type"], demo["lora_rank"], demo["lora_target"], demo["template"]) == ("lora", 8, "all",
                                                                                                    "qwen2_vl")
    assert demo["load_best_model_at_end"] and demo["eval_strategy"] == "steps" and demo["report_to"] == "tensorboard"
    cfg = build_config(demo)
    assert cfg.finetune.freeze_vision_tower and cfg.finetune.freeze_multi_modal_projector


def test_demo_rejects_bad_sizes_in_one_line(tmp_path):
    assert_one_line_error(run_cli("demo", "--out", str(tmp_path / "d"), "--steps", "0"), "--steps")
    assert_one_line_error(run_cli("demo", "--out", str(tmp_path / "d"), "--n_test", "1"), "--n_test")
    assert_one_line_error(run_cli("demo", "--bogus"), "vlmtune demo", "--bogus")
