"""`vlmtune sweep`: base model, every checkpoint-N and the final adapter, table + csv/json/png + best, on
every end-to-end family."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from helpers import ALL_ARCHS, assert_one_line_error, make_dataset, run_inline
from label_adapters import one_torch_thread

STEPS = (2, 4, 6)
MAX_PIXELS = 128 * 128


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", params=ALL_ARCHS)
def tiny_model_dir(request, tiny_models):
    return tiny_models(request.param)


def write_checkpoints(model_dir: Path, run: Path, steps=STEPS) -> Path:
    """checkpoint-N for each step: real (random, distinct) LoRA adapters with their processor files."""
    import torch
    from peft import LoraConfig, get_peft_model

    from vlmtune.data.processor import load_processor
    from vlmtune.model.adapters import lora_target_regex
    from vlmtune.model.load import load_model

    processor = load_processor(model_dir, max_pixels=MAX_PIXELS)
    for step in steps:
        torch.manual_seed(step)
        model = load_model(model_dir)
        regex, _ = lora_target_regex(model, "all")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=regex,
                                                      init_lora_weights=False))
        out = run / f"checkpoint-{step}"
        peft_model.save_pretrained(out)
        processor.save_pretrained(out)
    return run


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A training output_dir: real (random, distinct) LoRA adapters in checkpoint-N and a final one."""
    run = write_checkpoints(tiny_model_dir, tmp_path_factory.mktemp("sweep") / "my_task")
    (run / "checkpoint-8").mkdir()  # an incomplete checkpoint (no adapter): not a sweep point
    (run / "checkpoint-8" / "optimizer.pt").write_bytes(b"")
    for item in (run / "checkpoint-4").iterdir():  # the final adapter is the step-4 one (load_best_model_at_end)
        shutil.copy(item, run / item.name)
    return run


def test_sweep_evaluates_every_point_and_names_the_best(run_dir, tmp_path, capsys, tiny_model_dir):
    data = make_dataset(tmp_path / "data", n=8)
    result = run_inline(capsys, "sweep", run_dir, "--dataset", "my_dataset", "--dataset_dir", data,
                        "--batch_size", "4")
    assert result.returncode == 0, result.stderr

    with open(run_dir / "sweep.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["base", "checkpoint-2", "checkpoint-4", "checkpoint-6", "final"]
    assert [r["step"] for r in rows] == ["0", "2", "4", "6", "4"]  # final = the checkpoint it equals
    assert all(r["n"] == "8" for r in rows)
    # every adapter really changes the scores
    assert len({(r["roc_auc"], r["pr_auc"], r["best_threshold"]) for r in rows[:4]}) == 4
    summary = json.loads((run_dir / "sweep.json").read_text(encoding="utf-8"))
    assert summary["metric"] == "f1" and len(summary["points"]) == 5
    f1s = [float(r["f1"]) for r in rows]
    best = rows[f1s.index(max(f1s))]
    assert summary["best"]["name"] == best["name"]
    assert f"best by f1: {best['name']}" in result.stdout
    for name in ("base", "checkpoint-2", "checkpoint-6", "final"):
        assert name in result.stdout
    assert (run_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run_dir.glob(".sweep*"))  # atomic writes leave no temp files

    # Independent check of two points: the base model and the last checkpoint (loaded after two unloads).
    from vlmtune.data.loader import load_datasets
    from vlmtune.data.processor import load_processor
    from vlmtune.evaluate.metrics import compute_metrics
    from vlmtune.infer.engine import load_engine
    from vlmtune.infer.scoring import score_conversations

    convs = load_datasets("my_dataset", str(data), None).conversations
    labels = ["满足要求", "不满足要求"]
    for row, adapter in ((rows[0], None), (rows[3], run_dir / "checkpoint-6")):
        engine = load_engine(str(tiny_model_dir), str(adapter) if adapter else None, image_max_pixels=MAX_PIXELS,
                             log=lambda *_: None)
        probs = score_conversations(engine.model, engine.processor, convs, labels, batch_size=3)
        want = compute_metrics([c.answer for c in convs], [max(p, key=p.get) for p in probs],
                               positive_scores=[p[labels[0]] for p in probs], label_set=labels)
        for key in ("accuracy", "roc_auc", "pr_auc"):
            assert float(row[key]) == pytest.approx(want[key], abs=1e-9), (row["name"], key)
    assert load_processor(run_dir).max_pixels == MAX_PIXELS
    # The final adapter is the step-4 checkpoint: same numbers.
    assert {k: v for k, v in rows[4].items() if k not in ("name", "adapter", "seconds")} == \
        {k: v for k, v in rows[2].items() if k not in ("name", "adapter", "seconds")}


def test_sweep_evaluates_the_complete_checkpoints_and_names_the_incomplete(tiny_models, tmp_path, capsys):
    """Issue 25 item 10: a checkpoint whose removal or write did not finish (files missing) is left out with one
    line naming it and what it lacks; the complete ones are still evaluated (today the sweep refused the run, or
    evaluated one without its processor record at other pixel limits)."""
    run = write_checkpoints(tiny_models("qwen2_5_vl"), tmp_path / "run", steps=(2, 4, 6))
    (run / "checkpoint-4" / "adapter_model.safetensors").unlink()  # half removed: the weights went first
    (run / "checkpoint-6" / "preprocessor_config.json").unlink()  # half removed: its pixel limits went
    data = make_dataset(tmp_path / "data", n=4)
    result = run_inline(capsys, "sweep", run, "--dataset", "my_dataset", "--dataset_dir", data, "--batch_size", "4")
    assert result.returncode == 0, result.stderr
    with open(run / "sweep.csv", encoding="utf-8") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == ["base", "checkpoint-2"]
    lines = [line for line in result.stdout.splitlines() if "incomplete" in line]
    assert len(lines) == 1 and "left out 2 incomplete checkpoint(s)" in lines[0], result.stdout
    assert "checkpoint-4 (no adapter_model.safetensors" in lines[0] and \
        "checkpoint-6 (no preprocessor_config.json)" in lines[0], lines[0]


def test_sweep_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    data = make_dataset(tmp_path / "data", n=3)
    result = run_inline(capsys, "sweep", tmp_path / "empty", "--dataset", "my_dataset", "--dataset_dir", data)
    assert_one_line_error(result, "no adapter found")
    result = run_inline(capsys, "sweep", tmp_path / "absent", "--dataset", "my_dataset", "--dataset_dir", data)
    assert_one_line_error(result, "absent", "not found")
    result = run_inline(capsys, "sweep", tmp_path / "empty", "--dataset", "my_dataset", "--dataset_dir", data,
                        "--metric", "loss")
    assert_one_line_error(result, "--metric")


def test_best_row_takes_the_earliest_of_equals_and_skips_undefined():
    from vlmtune.evaluate.sweep import best_row

    rows = [{"name": "base", "f1": None}, {"name": "checkpoint-2", "f1": 0.5}, {"name": "checkpoint-4", "f1": 0.8},
            {"name": "checkpoint-6", "f1": 0.8}, {"name": "final", "f1": 0.7}]
    assert best_row(rows, "f1")["name"] == "checkpoint-4"
    assert best_row([{"name": "base", "f1": None}], "f1") is None


def test_sweep_never_writes_over_its_dataset(tmp_path, capsys, label_adapter, rules_dir):
    """A dataset kept in the run directory as sweep.json would be replaced by the sweep's summary: refused."""
    from helpers import checksums

    run = Path(shutil.copytree(label_adapter, tmp_path / "run"))
    shutil.copytree(rules_dir, run, dirs_exist_ok=True)
    (run / "rules.json").rename(run / "sweep.json")
    registry = run / "dataset_info.json"
    registry.write_text(registry.read_text().replace("rules.json", "sweep.json"))
    before = checksums(run)
    result = run_inline(capsys, "sweep", run, "--dataset", "rules", "--dataset_dir", run)
    assert_one_line_error(result, "sweep output", "sweep.json", "inputs")
    assert checksums(run) == before
