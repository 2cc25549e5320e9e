"""LLaMA-Factory's example YAMLs through the config parser: every key works, is inert with a reason, or is refused
with a reason — never an unknown-key error (`src/vlmtune/other_keys.py`)."""

from pathlib import Path

import pytest

from helpers import REPO, assert_one_line_error, run_inline
from vlmtune import other_keys
from vlmtune.config import build_config, inert_settings, key_sections, read_yaml
from vlmtune.errors import VlmtuneError

EXAMPLES = REPO / "tests" / "fixtures" / "llamafactory" / "examples"
FILES = sorted(EXAMPLES.rglob("*.yaml"))

# The examples vlmtune refuses, and the key that says why: other stages and methods it deliberately does not have.
REFUSED = {
    "extras/adam_mini/qwen2_full_sft.yaml": "use_adam_mini", "extras/apollo/llama3_full_sft.yaml": "use_apollo",
    "extras/asft/llama2_full_asft.yaml": "use_asft_loss", "extras/asft/qwen2_full_asft.yaml": "use_asft_loss",
    "extras/badam/llama3_full_sft.yaml": "use_badam", "extras/dft/qwen2_full_sft.yaml": "use_dft_loss",
    "extras/eaft/qwen25_05b_eaft_full.yaml": "use_eaft_loss", "extras/fp8/llama3_fp8_deepspeed_sft.yaml": "fp8",
    "extras/fp8/llama3_fp8_fsdp_sft.yaml": "fp8", "extras/galore/llama3_full_sft.yaml": "use_galore",
    "extras/llama_pro/llama3_freeze_sft.yaml": "use_llama_pro", "extras/loraplus/llama3_lora_sft.yaml":
    "loraplus_lr_ratio", "extras/mod/llama3_full_sft.yaml": "mixture_of_depths",
    "extras/muon/qwen2_full_sft.yaml": "use_muon", "extras/oft/llama3_oft_sft.yaml": "finetuning_type",
    "extras/oft/qwen2_5vl_oft_sft.yaml": "finetuning_type", "extras/pissa/llama3_lora_sft.yaml": "pissa_init",
    "extras/qoft/llama3_oft_sft_awq.yaml": "finetuning_type", "extras/qoft/llama3_oft_sft_bnb_npu.yaml":
    "finetuning_type", "extras/qoft/llama3_oft_sft_gptq.yaml": "finetuning_type",
    "train_lora/qwen3_lora_dpo.yaml": "stage", "train_lora/qwen3_lora_kto.yaml": "stage",
    "train_lora/qwen3_lora_pretrain.yaml": "stage", "train_lora/qwen3_lora_reward.yaml": "stage",
    "train_lora/qwen3vl_lora_dpo.yaml": "stage", "merge_lora/qwen3_gptq.yaml": "export_quantization_bit",
}


def with_local_paths(path: Path, tmp_path: Path) -> dict:
    """The file's keys with the model, data and output paths pointed here (as a user edits them); its template
    goes with its model (many are LLaMA or Qwen3 text templates, which vlmtune does not render)."""
    values = read_yaml(path)
    values.pop("template", None)
    if values.get("deepspeed"):
        values["deepspeed"] = str(REPO / "examples" / "deepspeed" / Path(values["deepspeed"]).name)
    values.update(model_name_or_path=str(tmp_path / "model"), dataset_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"))
    for key in ("adapter_name_or_path", "export_dir"):
        if key in values:
            values[key] = str(tmp_path / key)
    return values


def test_the_walk_covers_every_kind_of_example():
    names = {p.relative_to(EXAMPLES).parts[0] for p in FILES}
    assert names == {"train_lora", "train_full", "train_qlora", "extras", "ascend", "inference", "merge_lora"}
    assert len(FILES) >= 50 and set(REFUSED) <= {str(p.relative_to(EXAMPLES)) for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_key_of_llama_factorys_examples_works_is_inert_or_is_refused(path, tmp_path):
    name = str(path.relative_to(EXAMPLES))
    values = with_local_paths(path, tmp_path)
    settings = key_sections()
    if name in REFUSED:
        with pytest.raises(VlmtuneError) as refused:
            build_config(values, name)
        message = str(refused.value)
        key = REFUSED[name]
        assert "\n" not in message and f"'{key}: " in message and "unknown key" not in message, message
        assert "not supported" in message or "use " in message, message  # a reason and what to use instead
        return
    cfg = build_config(values, name)
    notes = inert_settings(cfg, world_size=1, has_cuda=False)
    for key, value in values.items():
        if key in settings:
            continue  # a vlmtune setting: it works (the other tests of the suite)
        kind = other_keys.kind_of(key)
        assert kind in ("inert", "trainer"), (key, kind)
        assert cfg.other[key] == value
        if other_keys.is_set(value):  # set, so the start-up says why it does nothing
            assert any(note.startswith(f"{key}=") and "has no effect: " in note for note in notes), (key, notes)


def test_a_typo_is_still_an_unknown_key_with_the_closest_one():
    with pytest.raises(VlmtuneError, match="unknown key 'lora_rnak' \\(did you mean 'lora_rank'\\?\\)"):
        build_config({"lora_rnak": 8})


@pytest.mark.parametrize("key", sorted(other_keys.REFUSED))
def test_a_refused_key_is_accepted_when_off_and_refused_with_a_reason_when_on(key):
    assert key not in key_sections()  # a setting is never also a refused key
    off = "concat" if key == "mix_strategy" else False
    cfg = build_config({key: off})
    assert cfg.other == {key: off} and not any(note.startswith(f"{key}=") for note in inert_settings(cfg, 1, False))
    with pytest.raises(VlmtuneError) as refused:
        build_config({key: "interleave_under" if key == "mix_strategy" else True}, "my.yaml")
    assert str(refused.value).startswith(f"my.yaml: '{key}: ") and other_keys.REFUSED[key] in str(refused.value)


def test_inert_keys_are_not_settings():
    assert not set(other_keys.INERT) & set(key_sections())
    assert not set(other_keys.INERT) & set(other_keys.REFUSED)


def test_a_refused_stage_stops_the_command_in_one_line(capsys, tmp_path):
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text("stage: dpo\nfinetuning_type: lora\npref_beta: 0.1\n")
    assert_one_line_error(run_inline(capsys, "train", cfg), "dpo.yaml", "'stage: dpo'", "supervised fine-tuning")
    cfg.write_text("use_galore: true\ngalore_rank: 16\n")
    assert_one_line_error(run_inline(capsys, "train", cfg), "'use_galore: True'", "GaLore is not supported")
