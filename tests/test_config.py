import dataclasses
from pathlib import Path

import pytest
import yaml

from helpers import REPO, assert_one_line_error, run_cli
from vlmtune.config import (SECTIONS, config_reference_markdown, inert_settings, key_sections, load_config)
from vlmtune.errors import VlmtuneError

USER_YAML = REPO / "examples" / "qwen2_5vl_lora_sft.yaml"


def test_users_yaml_loads_every_key_typed():
    cfg = load_config(USER_YAML)
    raw = yaml.safe_load(USER_YAML.read_text())
    flat = cfg.to_flat_dict()
    for key, value in raw.items():
        if key == "report_to":
            assert flat[key] == ["tensorboard"]
        else:
            assert flat[key] == value, key
    assert cfg.finetune.lora_rank == 8 and cfg.finetune.lora_alpha == 16
    assert cfg.train.learning_rate == pytest.approx(1e-4) and isinstance(cfg.train.learning_rate, float)
    assert cfg.data.val_size == pytest.approx(0.1)
    assert cfg.train.eval_steps == 50


def test_overrides_are_typed():
    cfg = load_config(USER_YAML, ["lora_rank=16", "bf16=false", "learning_rate=2e-4", "max_samples=10",
                                  "labels=[满足要求, 不满足要求]", "resume_from_checkpoint=true", "output_dir=/tmp/x"])
    assert cfg.finetune.lora_rank == 16 and isinstance(cfg.finetune.lora_rank, int)
    assert cfg.finetune.lora_alpha == 32  # default follows the overridden rank
    assert cfg.train.bf16 is False
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert cfg.data.labels == ["满足要求", "不满足要求"]
    assert cfg.train.resume_from_checkpoint is True
    assert cfg.train.output_dir == "/tmp/x"


def test_unknown_key_names_it_and_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rnak: 8\n")
    with pytest.raises(VlmtuneError, match=r"unknown key 'lora_rnak' \(did you mean 'lora_rank'\?\)"):
        load_config(bad)
    with pytest.raises(VlmtuneError, match="learning_rat"):
        load_config(None, ["learning_rat=1"])


@pytest.mark.parametrize("override,fragment", [
    ("lora_rank=eight", "'lora_rank' must be an integer"),
    ("bf16=maybe", "'bf16' must be true or false"),
    ("lr_scheduler_type=cosin", "'lr_scheduler_type' must be one of"),
    ("finetuning_type=qlora", "'finetuning_type' must be one of"),
    ("cutoff_len=0", "'cutoff_len' must be > 0"),
])
def test_bad_values_are_clear(override, fragment):
    with pytest.raises(VlmtuneError, match=fragment):
        load_config(None, [override])


def test_bad_yaml_is_one_line_error_from_the_shell(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: [8\n")
    assert_one_line_error(run_cli("data", "check", str(bad)), str(bad), "not valid YAML")
    bad.write_text("dataset: x\nlora_rnak: 8\n")
    assert_one_line_error(run_cli("data", "check", str(bad)), "unknown key 'lora_rnak'", "lora_rank")


def test_ignored_keys_are_reported_not_dropped():
    cfg = load_config(USER_YAML)
    notes = inert_settings(cfg, world_size=1, has_cuda=False)
    assert any("ddp_timeout=180000000" in n for n in notes)
    assert any("video_max_pixels" in n for n in notes)
    assert not any("ddp_timeout" in n for n in inert_settings(cfg, world_size=8, has_cuda=True))
    assert any("enable_thinking=false has no effect with template qwen2_vl" in n
               for n in inert_settings(load_config(USER_YAML, ["enable_thinking=false"]), 1, False))
    thinking = load_config(USER_YAML, ["enable_thinking=false", "template=qwen3_vl"])
    assert not any("enable_thinking" in n for n in inert_settings(thinking, 1, False))


def test_bare_no_is_the_string_no(tmp_path):
    """`eval_strategy: no` in a YAML, or eval_strategy=no on the command line, is the choice "no", not false."""
    path = tmp_path / "cfg.yaml"
    path.write_text("eval_strategy: no\nsave_strategy: steps\n")
    assert load_config(path).train.eval_strategy == "no"
    assert load_config(path, ["save_strategy=no"]).train.save_strategy == "no"


def test_template_names_are_llama_factorys():
    from vlmtune.data.template import TEMPLATE_NAMES

    assert {"qwen3_vl_nothink", "qwen3_5", "qwen3_5_nothink", "qwen3_6", "qwen3_8"} <= set(TEMPLATE_NAMES)
    for name in TEMPLATE_NAMES:
        assert load_config(USER_YAML, [f"template={name}"]).data.template == name
    with pytest.raises(VlmtuneError, match="'template' must be one of qwen2_vl, qwen3_vl_nothink, qwen3_vl"):
        load_config(USER_YAML, ["template=llava"])


def test_every_key_has_help_and_one_section():
    keys = key_sections()
    assert sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values()) == len(keys)
    for key, (_, f) in keys.items():
        assert f.metadata.get("help"), key


def test_docs_config_reference_is_current():
    """docs/config.md is generated from the dataclasses (`make docs`); it must not drift."""
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8").strip() == config_reference_markdown().strip()


def test_readme_documents_every_command_and_points_to_every_key():
    from vlmtune.cli import COMMANDS

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in COMMANDS:
        assert f"vlmtune {name}" in readme, name
    assert "docs/config.md" in readme
    assert "make demo" in readme and "make test" in readme


@pytest.mark.parametrize("text", ["output_dir: null", "output_dir: ~", "output_dir:"])
def test_a_null_string_setting_is_refused_not_the_text_none(tmp_path, text):
    """`output_dir: null` became the text "None" (a run written into ./None)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model_name_or_path: m\ndataset: d\n{text}\n", encoding="utf-8")
    with pytest.raises(VlmtuneError, match=r"'output_dir' needs a value, got null"):
        load_config(path)
    with pytest.raises(VlmtuneError, match=r"'dataset_dir' needs a value"):
        load_config(None, ["dataset_dir="])
