"""`vlmtune train` as a new user runs it: every output exists, the loss falls, plots and events are real."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import MOE_ARCHS, REPO, TEMPLATE_OF, assert_one_line_error, run_cli, run_inline
from vlmtune.families import family_of_type

pytestmark = pytest.mark.slow


# What the log says of each family's tiny model at LoRA r=8, `lora_target: all` (Qwen3-VL's MoE: attention only;
# Qwen3.5: the linear-attention projections too, and on its MoE the shared expert and its gate).
SUMMARIES = {
    "qwen2_vl": ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                 "trainable params: 32,768 || all params: 832,000 || trainable%: 3.9385"),
    "qwen2_5_vl": ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   "trainable params: 32,768 || all params: 848,320 || trainable%: 3.8627"),
    "qwen3_5": ("out_proj,in_proj_qkv,in_proj_z,in_proj_b,in_proj_a,gate_proj,up_proj,down_proj,q_proj,k_proj,v_proj,o_proj",
                "trainable params: 35,904 || all params: 893,672 || trainable%: 4.0176"),
    "qwen3_5_moe": ("out_proj,in_proj_qkv,in_proj_z,in_proj_b,in_proj_a,gate_proj,up_proj,down_proj,shared_expert_gate,"
                    "q_proj,k_proj,v_proj,o_proj", "trainable params: 28,752 || all params: 936,952 || trainable%: 3.0687"),
    "qwen3_vl": ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                 "trainable params: 32,768 || all params: 954,944 || trainable%: 3.4314"),
    "qwen3_vl_moe": ("q_proj,k_proj,v_proj,o_proj", "trainable params: 14,336 || all params: 937,536 || trainable%: 1.5291"),
}


def test_tiny_cpu_run_writes_everything(family_train_config, arch, tmp_path, capsys):
    """In this process (the shell runs are the LLaMA-Factory YAML tests below), its output captured, not a terminal."""
    cfg = family_train_config(num_train_epochs=3, gradient_accumulation_steps=2, logging_steps=2, save_steps=6,
                              eval_steps=6, val_size=0.25, learning_rate=5e-3)
    result = run_inline(capsys, "train", cfg)
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(tmp_path / "out")
    log = result.stdout + result.stderr
    modules, summary = SUMMARIES[arch]
    for line in ("Process rank: 0, world size: 1, device: cpu", "Fine-tuning method: LoRA",
                 f"Found linear modules: {modules}", summary,
                 "Num examples = 9", "Total train batch size (w. parallel, distributed & accumulation) = 2",
                 "Total optimization steps = 15", "training example", "note: ddp_timeout=180000000"):
        assert line in log, line
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "preprocessor_config.json",
                 "vlmtune_template.json", "trainer_log.jsonl", "train_results.json", "eval_results.json", "all_results.json",
                 "training_loss.png", "training_eval_loss.png", "training_eval_f1.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    for ckpt in out.glob("checkpoint-*"):
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pth",
                     "trainer_state.json"):
            assert (ckpt / name).is_file(), (ckpt, name)
    results = json.loads((out / "all_results.json").read_text())
    for key in ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_loss",
                "eval_f1", "eval_accuracy"):
        assert key in results, key
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "samples_per_second", "tokens_per_second",
                "peak_memory_mb"):
        assert key in train_rows[0], key
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5  # it learns
    # Output to a pipe, as in a log file or CI: no bar redrawn with carriage returns (ours or transformers'
    # weight loading), and one progress line per logging step instead.
    assert "\r" not in log
    progress = [line for line in result.stdout.splitlines() if line.startswith("[train step ")]
    assert [line.split()[2] for line in progress] == [f"{r['step']}/15]" for r in train_rows]
    assert all(line.endswith(" left)") and " elapsed, " in line for line in progress), progress
    assert [r["step"] for r in rows if "eval_loss" in r] == [6, 12, 15]
    # the plot is a real picture, not an empty canvas
    with Image.open(out / "training_loss.png") as image:
        assert image.size[0] > 300 and len(image.convert("L").getcolors(maxcolors=256)) > 10
    # TensorBoard reads the events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs" / "out"))  # runs/<run name: output_dir's by default>
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "eval/loss", "eval/f1"} <= tags
    assert len(events.Scalars("train/loss")) == len(train_rows)


def test_refuses_non_empty_output_dir_and_bad_data(train_config, tmp_path, small_dataset, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = train_config(overwrite_output_dir=False)
    assert_one_line_error(run_inline(capsys, "train", cfg), "output_dir is not empty", "overwrite_output_dir")
    assert (out / "keep.txt").read_text() == "mine"
    # a missing image stops training with the problem listed, unless skip_bad_records
    (small_dataset / "images" / "img_3.png").unlink()
    cfg = train_config("bad.yaml", output_dir=str(tmp_path / "out2"), max_steps=2, val_size=0)
    result = run_inline(capsys, "train", cfg)
    assert_one_line_error(result, "1 data problem(s) in 1 record(s)", "skip_bad_records")
    assert "record 3: field 'images[0]': image not found" in result.stdout
    cfg = train_config("skip.yaml", output_dir=str(tmp_path / "out3"), max_steps=2, val_size=0,
                       skip_bad_records=True)
    result = run_inline(capsys, "train", cfg)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipping 1 bad record(s) of 12" in result.stdout


def test_best_checkpoint_by_task_metric_becomes_the_final_adapter(train_config, tmp_path, capsys):
    cfg = train_config(max_steps=12, gradient_accumulation_steps=1, logging_steps=3, save_steps=3, eval_steps=3,
                       val_size=0.34, learning_rate=2e-2, load_best_model_at_end=True,
                       metric_for_best_model="eval_loss", report_to="none", plot_loss=False)
    result = run_inline(capsys, "train", cfg)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 12]
    assert all("eval_f1" in r and "eval_accuracy" in r and "eval_roc_auc" in r for r in evals)
    best = min(evals, key=lambda r: r["eval_loss"])
    assert f"final adapter = best by eval_loss: step {best['step']}" in result.stdout
    results = json.loads((out / "all_results.json").read_text())
    assert results["best_step"] == best["step"]
    from safetensors.torch import load_file

    final = load_file(out / "adapter_model.safetensors")
    chosen = load_file(out / f"checkpoint-{best['step']}" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    if best["step"] != 12:  # the last step's adapter differs from the best one
        last = load_file(out / "checkpoint-12" / "adapter_model.safetensors")
        assert any(not torch.equal(final[k], last[k]) for k in final)


def test_users_qwen3_yaml_trains_and_predicts_unchanged(tiny_models, small_dataset, tmp_path):
    """The LLaMA-Factory YAML for Qwen3-VL (`template: qwen3_vl_nothink`), as a new user runs it on a CPU: the
    file unchanged, only paths and the run's length given on the command line."""
    yaml_path = REPO / "examples" / "qwen3vl_lora_sft.yaml"
    model = tiny_models("qwen3_vl")
    out = tmp_path / "out"
    result = run_cli("train", str(yaml_path), f"model_name_or_path={model}", f"dataset_dir={small_dataset}",
                     f"output_dir={out}", "bf16=false", "max_steps=4", "gradient_accumulation_steps=2",
                     "logging_steps=1", "save_steps=2", "eval_steps=2", "val_size=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "template: qwen3_vl_nothink (Qwen3-VL)" in result.stdout
    assert "<|im_start|>system\n你是一个商品陈列合规检查助手。<|im_end|>" in result.stdout  # the record's own
    assert "eval_f1" in (out / "all_results.json").read_text()
    save = tmp_path / "predictions.jsonl"
    predicted = run_cli("predict", "--model_name_or_path", str(model), "--adapter_name_or_path", str(out),
                        "--template", "qwen3_vl_nothink", "--dataset", "my_dataset", "--dataset_dir",
                        str(small_dataset), "--save_name", str(save))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in save.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 12 and all(r["predict"] in ("满足要求", "不满足要求") for r in rows)
    assert all(not r["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.") for r in rows)


# LLaMA-Factory's own example YAMLs, unchanged (tests/fixtures/llamafactory/examples/; its README names the commit).
LF_EXAMPLES = REPO / "tests" / "fixtures" / "llamafactory" / "examples"


def test_llama_factorys_qwen3_5_example_trains_and_predicts(tiny_models, small_dataset, tmp_path):
    """As a new user would: LLaMA-Factory's Qwen3.5-MoE LoRA YAML (template qwen3_5_nothink, flash_attn: fa2, bf16,
    use_v1_kernels, packing and disable_gradient_checkpointing) pointed at a tiny Qwen3.5-MoE and a registered
    ShareGPT image dataset passes the data check, trains and predicts on a CPU; the start-up says what its template
    and fa2 mean here."""
    import yaml

    arch = next(t for t in MOE_ARCHS if family_of_type(t).recurrent_state)
    cfg = LF_EXAMPLES / "ascend" / "qwen3_5moe_lora_sft_fsdp2.yaml"
    assert yaml.safe_load(cfg.read_text())["template"] == "qwen3_5_nothink"
    checked = run_cli("data", "check", str(cfg), f"model_name_or_path={tiny_models(arch)}", "dataset=my_dataset",
                      f"dataset_dir={small_dataset}")
    assert checked.returncode == 0 and "no problems found" in checked.stdout, checked.stdout + checked.stderr
    out, model = tmp_path / "out", tiny_models(arch)
    result = run_cli("train", str(cfg), f"model_name_or_path={model}", "dataset=my_dataset",
                     f"dataset_dir={small_dataset}", f"output_dir={out}", "max_steps=3", "save_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "gradient checkpointing: on" not in log and "packing" not in log  # turned off; off, so no note
    for line in ("template: qwen3_5_nothink (Qwen3.5)", "template qwen3_5_nothink renders no thought block",
                 "flash_attention_2 (flash_attn: fa2): there is no CUDA device; using sdpa",
                 "Found linear modules: out_proj,in_proj_qkv,in_proj_z,in_proj_b,in_proj_a,gate_proj,up_proj,"
                 "down_proj,shared_expert_gate,q_proj,k_proj,v_proj,o_proj", "compute dtype: torch.bfloat16"):
        assert line in log, line
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
    save = tmp_path / "predictions.jsonl"
    predicted = run_cli("predict", "--adapter_name_or_path", str(out), "--dataset", "my_dataset", "--dataset_dir",
                        str(small_dataset), "--save_name", str(save))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in save.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 12 and all(r["predict"] in ("满足要求", "不满足要求") for r in rows)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)  # as trained: no thought block


def test_llama_factorys_qwen3_vl_example_checks_and_trains(tiny_models, small_dataset, tmp_path, capsys):
    """LLaMA-Factory's examples/train_lora/qwen3vl_lora_sft.yaml, pointed at a tiny Qwen3-VL and a registered
    image dataset (fewer steps): data check and training pass, with gradient checkpointing on as there."""
    import yaml

    cfg = LF_EXAMPLES / "train_lora" / "qwen3vl_lora_sft.yaml"
    template = yaml.safe_load(cfg.read_text())["template"]
    arch = next(t for t in TEMPLATE_OF if TEMPLATE_OF[t] == template)
    paths = (f"model_name_or_path={tiny_models(arch)}", "dataset=my_dataset", f"dataset_dir={small_dataset}")
    checked = run_inline(capsys, "data", "check", cfg, *paths)
    assert checked.returncode == 0 and "no problems found" in checked.stdout, checked.stdout + checked.stderr
    out = tmp_path / "out"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # its bf16 in this process, after earlier in-process runs in fp32
    try:
        result = run_inline(capsys, "train", cfg, *paths, f"output_dir={out}", "max_steps=2",
                            "gradient_accumulation_steps=2", "save_steps=2")
    finally:
        AcceleratorState._reset_state(True)  # and fp32 again for the runs after it
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    for line in (f"template: {template}", "gradient checkpointing: on (non-reentrant",
                 "note: video_max_pixels has no effect", "Total optimization steps = 2"):
        assert line in log, line
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
