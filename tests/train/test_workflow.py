"""LLaMA-Factory's other entry point through `vlmtune train`: a predict YAML (examples/extras/nlg_eval/
llama3_lora_predict.yaml's keys, paths pointed at a tiny model, a label adapter and the rules dataset) writes
output_dir/generated_predictions.jsonl with LLaMA-Factory's prompt / predict / label and vlmtune's own fields; and
do_train + do_predict trains, then predicts with the adapter it trained. In-process runs (`run_inline`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import TEMPLATE_OF, run_inline
from vlmtune.errors import VlmtuneError
from vlmtune.families import TINY_DEFAULT

POS, NEG = "满足要求", "不满足要求"


def predict_yaml(path: Path, model_dir: Path, adapter: Path, data_dir: Path, output_dir: Path, **changes) -> Path:
    """LLaMA-Factory's predict YAML (its keys and values; no do_train, as there), paths changed."""
    values = {
        "model_name_or_path": str(model_dir), "adapter_name_or_path": str(adapter), "trust_remote_code": True,
        "stage": "sft", "do_predict": True, "finetuning_type": "lora",
        "eval_dataset": "rules", "dataset_dir": str(data_dir), "template": TEMPLATE_OF[TINY_DEFAULT],
        "cutoff_len": 2048, "max_samples": 6, "overwrite_cache": True, "preprocessing_num_workers": 16,
        "dataloader_num_workers": 4,
        "output_dir": str(output_dir), "overwrite_output_dir": True, "report_to": "none",
        "per_device_eval_batch_size": 3, "predict_with_generate": True, "ddp_timeout": 180000000,
        "max_new_tokens": 4,
    }
    values.update(changes)
    path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_predict_yaml_through_train_writes_generated_predictions(tmp_path, capsys, tiny_model_dir, label_adapter,
                                                                 rules_dir):
    out = tmp_path / "predict"
    config = predict_yaml(tmp_path / "predict.yaml", tiny_model_dir, label_adapter, rules_dir, out, num_beams=2)
    result = run_inline(capsys, "train", config)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out / "generated_predictions.jsonl")
    assert len(rows) == 6
    for row in rows:
        assert {"prompt", "predict", "label"} <= set(row), row  # LLaMA-Factory's fields
        assert {"id", "images"} <= set(row) and "scores" not in row  # vlmtune's; generated, so no label scores
        assert row["label"] in (POS, NEG) and "<image>" in row["prompt"]
    assert sum(row["predict"] == row["label"] for row in rows) >= 5  # the adapter has learned the answers
    assert "mode: generate (predict_with_generate: true)" in result.stdout
    assert "num_beams=2 has no effect" in result.stdout  # a generating key without effect says so
    assert not (out / "adapter_model.safetensors").exists()  # nothing was trained


def test_predict_with_generate_false_scores_the_closed_label_set(tmp_path, capsys, tiny_model_dir, label_adapter,
                                                                 rules_dir):
    out = tmp_path / "score"
    config = predict_yaml(tmp_path / "score.yaml", tiny_model_dir, label_adapter, rules_dir, out,
                          predict_with_generate=False, do_train=False, temperature=0.7)
    result = run_inline(capsys, "train", config)
    assert result.returncode == 0, result.stderr
    assert "mode: score (the answers form the label set" in result.stdout
    assert "predict_with_generate: false" in result.stdout
    note = next(line for line in result.stdout.splitlines() if "no effect: label scoring" in line)
    assert "max_new_tokens, temperature have no effect" in note  # the generating keys said to be unused, in a line
    rows = read_rows(out / "generated_predictions.jsonl")
    assert all(set(row["scores"]) == {POS, NEG} and row["predict"] in (POS, NEG) for row in rows)


def test_train_then_predict_uses_the_trained_adapter(capsys, train_config):
    path = train_config("train_predict.yaml", do_predict=True, eval_dataset="my_dataset", max_steps=2, max_samples=4,
                        save_steps=2, eval_steps=2, per_device_eval_batch_size=4)
    output_dir = Path(yaml.safe_load(path.read_text(encoding="utf-8"))["output_dir"])
    result = run_inline(capsys, "train", path)
    assert result.returncode == 0, result.stderr
    meta = json.loads((output_dir / "generated_predictions.jsonl.meta.json").read_text(encoding="utf-8"))
    assert meta["adapter"] == str(output_dir.resolve())  # the adapter just trained
    assert len(read_rows(output_dir / "generated_predictions.jsonl")) == 4


def test_predict_yaml_without_eval_dataset_is_one_line(tmp_path, capsys, tiny_model_dir, label_adapter, rules_dir):
    config = predict_yaml(tmp_path / "p.yaml", tiny_model_dir, label_adapter, rules_dir, tmp_path / "o",
                          eval_dataset=None)
    result = run_inline(capsys, "train", config)
    assert result.returncode == 1 and "do_predict predicts eval_dataset" in result.stderr


def test_flags_without_a_yaml_train_as_the_same_yaml(tmp_path, capsys, tiny_model_dir, small_dataset):
    """`llamafactory-cli train --stage sft --do_train --model_name_or_path ...` (HfArgumentParser's flags, no YAML):
    `vlmtune train` with the same flags trains the same adapter as with a YAML of those keys."""
    from safetensors.torch import load_file

    keys = {"stage": "sft", "do_train": True, "model_name_or_path": str(tiny_model_dir), "dataset": "my_dataset",
            "dataset_dir": str(small_dataset), "finetuning_type": "lora", "lora_target": "all", "max_steps": 2,
            "learning_rate": "1e-3", "per_device_train_batch_size": 2, "report_to": "none", "save_strategy": "no",
            "plot_loss": False, "bf16": False, "disable_tqdm": True, "seed": 3}
    cfg = tmp_path / "same.yaml"
    cfg.write_text(yaml.safe_dump({**keys, "output_dir": str(tmp_path / "yaml")}), encoding="utf-8")
    assert run_inline(capsys, "train", cfg).returncode == 0
    flags = []  # the three spellings: a bare --flag (true), --key=value, --key value
    for key, value in {**keys, "output_dir": str(tmp_path / "flags")}.items():
        flags += [f"--{key}"] if value is True else [f"--{key}={value}"] if key == "seed" else [f"--{key}", str(value)]
    result = run_inline(capsys, "train", *flags)
    assert result.returncode == 0, result.stderr
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("yaml", "flags"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    wrong = run_inline(capsys, "train", "--stage", "sft", "--learnin_rate", "1")
    assert wrong.returncode == 1 and "unknown key 'learnin_rate' (did you mean 'learning_rate'?)" in wrong.stderr


def test_flags_are_read_as_hfargumentparser_reads_them():
    """A string key's value is the text typed (`#1` was a YAML comment: None), a key that is no flag needs its value
    (`--output_dir` at the end wrote into 'yes'), one value but for a list key (`--output_dir a b` was 'a,b'), and
    `-x` is not swallowed as a value of the key before it."""
    from vlmtune.commands.train import flags_as_overrides
    from vlmtune.config import load_config

    cfg = load_config(None, flags_as_overrides(["--default_system", "#1: 看图\n", "--report_to", "none", "tensorboard",
                                                "--do_train", "--output_dir", "null"]))
    assert cfg.data.default_system == "#1: 看图\n" and cfg.train.report_to == ["tensorboard"]
    assert cfg.train.do_train is True and cfg.train.output_dir == "null"
    assert flags_as_overrides(["--adam_epsilon", "-1e-8"]) == ["adam_epsilon=-1e-8"]  # a negative number is a value
    refused = {("--output_dir",): "--output_dir needs a value", ("--output_dir=",): "--output_dir is given an empty",
               ("--output_dir", "a", "b"): "--output_dir takes one value, got 2",
               ("--dataset", "d", "-x"): "'-x' is not a --key"}
    for argv, fragment in refused.items():
        with pytest.raises(VlmtuneError, match=fragment):
            flags_as_overrides(list(argv))


def test_llama_factorys_web_ui_preview_command_runs_as_printed(tmp_path, capsys, tiny_model_dir, small_dataset):
    """The command LLaMA-Factory's web UI previews for a LoRA run (`webui/common.gen_cmd` over the arguments of
    `webui/runner._parse_train_args`: every key it writes, lists as space-separated values, backslash line ends),
    paths pointed here and one step: `vlmtune train` takes it as printed."""
    import shlex

    preview = f"""llamafactory-cli train \\
    --stage sft \\
    --do_train True \\
    --model_name_or_path {tiny_model_dir} \\
    --preprocessing_num_workers 16 \\
    --finetuning_type lora \\
    --template {TEMPLATE_OF[TINY_DEFAULT]} \\
    --flash_attn auto \\
    --dataset_dir {small_dataset} \\
    --dataset my_dataset \\
    --cutoff_len 2048 \\
    --learning_rate 5e-05 \\
    --num_train_epochs 3.0 \\
    --max_samples 100000 \\
    --per_device_train_batch_size 2 \\
    --gradient_accumulation_steps 8 \\
    --lr_scheduler_type cosine \\
    --max_grad_norm 1.0 \\
    --logging_steps 5 \\
    --save_steps 100 \\
    --warmup_steps 0 \\
    --packing False \\
    --enable_thinking True \\
    --report_to none \\
    --output_dir {tmp_path / "saves"} \\
    --bf16 False \\
    --plot_loss True \\
    --trust_remote_code True \\
    --ddp_timeout 180000000 \\
    --include_num_input_tokens_seen True \\
    --optim adamw_torch \\
    --mask_history False \\
    --lora_rank 8 \\
    --lora_alpha 16 \\
    --lora_dropout 0 \\
    --lora_target all \\
    --freeze_vision_tower True \\
    --freeze_multi_modal_projector True \\
    --image_max_pixels 589824 \\
    --image_min_pixels 1024 \\
    --video_max_pixels 65536 \\
    --video_min_pixels 256 \\
    --max_steps 1"""
    argv = shlex.split(preview.replace("\\\n", " "))
    assert argv[:2] == ["llamafactory-cli", "train"]
    result = run_inline(capsys, "train", *argv[2:])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "saves" / "adapter_model.safetensors").is_file()
