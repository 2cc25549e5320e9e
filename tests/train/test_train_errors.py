"""`vlmtune train` on bad settings, a hostile environment and damaged checkpoints (issue 17).

Each case of the table is one `error:` line naming the setting or file, exit code 1, no traceback, and the
inputs unchanged. The runs are in-process (`run_inline`) on the tiny model: the table's cases stop before the
model loads; the resume cases train 4 steps once, then try to resume in ways that do not fit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import (assert_one_line_error, changed_files, checksums, make_dataset, run_inline, save_bomb, truncate,
                     unwritable_dir, write_config)
from label_adapters import one_torch_thread

SHORT = dict(max_steps=4, save_steps=2, logging_steps=1, gradient_accumulation_steps=1, per_device_train_batch_size=2,
             val_size=0, eval_strategy="no", plot_loss=False, report_to="none", disable_tqdm=True)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def yaml_text(path: Path, text: bytes) -> Path:
    path.write_bytes(text)
    return path


# case → (settings (or a function(tmp, cfg path) → the YAML to run), fragments of the one error line)
CASES = {
    "negative learning rate": (dict(learning_rate=-1e-4), ["'learning_rate'", "> 0", "-0.0001"]),
    "learning rate NaN": (dict(learning_rate=float("nan")), ["'learning_rate'", "nan"]),
    "dropout 1": (dict(lora_dropout=1.0), ["'lora_dropout'", "[0, 1)"]),
    "dropout negative": (dict(lora_dropout=-0.1), ["'lora_dropout'"]),
    "warmup_ratio above 1": (dict(warmup_ratio=1.5), ["'warmup_ratio'", "[0, 1]"]),
    "num_train_epochs 0": (dict(num_train_epochs=0, max_steps=-1), ["'num_train_epochs'", "> 0"]),
    "unknown metric_for_best_model": (dict(metric_for_best_model="f2"), ["'metric_for_best_model'", "'f2'", "f1"]),
    "seed beyond numpy's": (dict(seed=2**40), ["'seed'"]),
    "save_total_limit 0": (dict(save_total_limit=0), ["'save_total_limit'"]),
    "one label": (dict(labels=["满足要求"]), ["'labels'", "two"]),
    "val_size leaves 1 training record": (dict(val_size=11), ["val_size 11", "leaves 1 training record"]),
    "duplicate YAML key": (lambda tmp, cfg: yaml_text(cfg, cfg.read_bytes() + b"learning_rate: 0.5\n"),
                           ["cfg.yaml", "'learning_rate'", "already set"]),
    "YAML not UTF-8": (lambda tmp, cfg: yaml_text(cfg, cfg.read_bytes() + b"run_name: \xff\n"), ["cfg.yaml", "UTF-8"]),
    "YAML nested too deeply": (lambda tmp, cfg: yaml_text(cfg, b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
                               ["cfg.yaml", "YAML"]),
    "output_dir is a file": (lambda tmp, cfg: dict(output_dir=str(yaml_text(tmp / "taken", b"mine"))),
                             ["output_dir", "taken", "is a file"]),
    "output_dir under a file": (lambda tmp, cfg: dict(output_dir=str(yaml_text(tmp / "taken", b"mine") / "out")),
                                ["output_dir", "is under", "taken", "a file"]),
    "output_dir read-only": (lambda tmp, cfg: dict(output_dir=str(unwritable_dir(tmp))),
                             ["output_dir", "cannot write there"]),
    "a decompression bomb in the data": (lambda tmp, cfg: save_bomb(tmp / "data" / "images" / "img_3.png"),
                                         ["1 data problem(s) in 1 record(s)", "skip_bad_records"]),
    "a truncated image in the data": (lambda tmp, cfg: truncate(tmp / "data" / "images" / "img_5.png", 2 / 3),
                                      ["1 record(s) could not be encoded", "skip_bad_records"]),
    # issue 25: refused before the encoding, not a traceback after it (item 10) or inert after training (item 6)
    "batch size far beyond the data": (dict(per_device_train_batch_size=10**8),
                                       ["per_device_train_batch_size: 100000000", "12 training records", "at most 12"]),
    "load_best_model_at_end without a validation split": (
        dict(load_best_model_at_end=True, eval_strategy="steps"),
        ["load_best_model_at_end", "no validation split", "val_size 0", "eval_dataset"]),
    "early stopping with eval_strategy no": (dict(early_stopping_patience=2, val_size=4),
                                             ["early_stopping_patience", "eval_strategy is no"]),
    "roc_auc on a one-class validation split": (
        dict(metric_for_best_model="roc_auc", val_size=1, eval_strategy="steps"),
        ["metric_for_best_model: roc_auc", "every one of the 1 validation answers", "eval_roc_auc", "both labels"]),
    "labels that match none of the answers": (
        dict(labels=["yes", "no"], val_size=4, eval_strategy="steps"),
        ["my_dataset.json: record", "is not one of labels ['yes', 'no']", "none of the answers"]),
    # issue 25 item 4: a label typed two ways is refused at the start, not a traceback after the last step
    "an answer with a trailing full-width period": (lambda tmp, cfg: period_after_answer(tmp / "data"),
                                                    ["1 data problem(s) in 1 record(s)", "skip_bad_records"]),
}


def period_after_answer(data: Path, index: int = 3) -> None:
    path = data / "my_dataset.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    records[index]["messages"][-1]["content"] += "。"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_setting_is_one_line_and_no_input_changes(train_config, tmp_path, capsys, small_dataset, tiny_model_dir,
                                                       case):
    settings, fragments = CASES[case]
    cfg = train_config(**SHORT)
    if callable(settings):
        made = settings(tmp_path, cfg)
        if isinstance(made, dict):
            cfg = train_config(**{**SHORT, **made})
    else:
        cfg = train_config(**{**SHORT, **settings})
    before = checksums(tmp_path, tiny_model_dir)
    result = run_inline(capsys, "train", cfg)
    assert_one_line_error(result, *fragments)
    assert not changed_files(before, tmp_path, tiny_model_dir)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory, tiny_model_dir) -> Path:
    """The output_dir of a 4-step run with checkpoint-2 and checkpoint-4 (trained once; cases copy it)."""
    base = tmp_path_factory.mktemp("pristine")
    data = make_dataset(base / "data")
    out = base / "out"
    cfg = write_config(base / "cfg.yaml", **run_settings(tiny_model_dir, data, out))
    with one_torch_thread():
        from vlmtune.cli import main as cli_main

        assert cli_main(["train", str(cfg)]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return base


def run_settings(model: Path, data: Path, out: Path, **changes) -> dict:
    return dict(model_name_or_path=str(model), dataset_dir=str(data), output_dir=str(out), image_max_pixels=50176,
                **{**SHORT, **changes})


@pytest.fixture
def finished_run(pristine_run, tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """(config, output_dir) of a copy of the pristine run, with its own data and output_dir."""
    data = Path(shutil.copytree(pristine_run / "data", tmp_path / "data"))
    out = Path(shutil.copytree(pristine_run / "out", tmp_path / "out"))
    return write_config(tmp_path / "cfg.yaml", **run_settings(tiny_model_dir, data, out)), out


def garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint file" * 4)


def without_run_shape(checkpoint: Path) -> None:
    """A checkpoint written before the run's shape was recorded: only its weights can tell."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state.pop("run")
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def change_answers(dataset: Path, n: int) -> None:
    """Flip the answers of the first n records (the images and prompts unchanged): other data of the same size."""
    records = json.loads(dataset.read_text(encoding="utf-8"))
    flip = {"满足要求": "不满足要求", "不满足要求": "满足要求"}
    for record in records[:n]:
        record["messages"][-1]["content"] = flip[record["messages"][-1]["content"]]
    dataset.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


# case → (damage the run in out, the overrides of the resume, fragments of the one error line)
RESUMES = {
    "answers of 5 of the 12 records changed": (lambda out: change_answers(out.parent / "data" / "my_dataset.json", 5),
                                               [], ["checkpoint-4", "trained on other data", "data digest"]),
    "step beyond the schedule": (None, ["max_steps=3"], ["checkpoint-4", "step 4", "beyond", "3 optimisation steps"]),
    "other gradient accumulation": (None, ["gradient_accumulation_steps=2"],
                                    ["checkpoint-4", "gradient_accumulation_steps was 1", "2 now"]),
    "other batch size": (None, ["per_device_train_batch_size=1"], ["per_device_train_batch_size was 2"]),
    "other lora_rank": (None, ["lora_rank=4"], ["lora_rank was 8", "4 now"]),
    "other lora_rank, unrecorded": (lambda out: without_run_shape(out / "checkpoint-4"), ["lora_rank=4"],
                                    ["checkpoint-4/adapter_model.safetensors", "[8, ", "[4, ", "lora_rank"]),
    "truncated adapter": (lambda out: truncate(out / "checkpoint-4" / "adapter_model.safetensors"), [],
                          ["checkpoint-4/adapter_model.safetensors", "not a readable safetensors"]),
    "garbage optimizer": (lambda out: garbage(out / "checkpoint-4" / "optimizer.pt"), [],
                          ["checkpoint-4/optimizer.pt", "cannot read", "damaged"]),
    "truncated scheduler": (lambda out: truncate(out / "checkpoint-4" / "scheduler.pt"), [],
                            ["checkpoint-4/scheduler.pt", "cannot read"]),
    "garbage trainer state": (lambda out: garbage(out / "checkpoint-4" / "trainer_state.json"), [],
                              ["checkpoint-4/trainer_state.json", "not valid JSON"]),
    "trainer state of the wrong shape": (
        lambda out: (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": "four"}'), [],
        ["trainer_state.json", "field 'global_step'", "'four'"]),
    "trainer state with a best metric that is text": (
        lambda out: (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "best_metric": "x"}'),
        [], ["trainer_state.json", "field 'best_metric'"]),
}


@pytest.mark.parametrize("case", list(RESUMES))
def test_a_resume_that_does_not_fit_is_refused_with_the_reason(finished_run, capsys, tiny_model_dir, case):
    cfg, out = finished_run
    make_bad, overrides, fragments = RESUMES[case]
    if make_bad:
        make_bad(out)
    before = checksums(cfg.parent, tiny_model_dir)
    result = run_inline(capsys, "train", cfg, "resume_from_checkpoint=true", *overrides)
    assert_one_line_error(result, *fragments)
    assert not changed_files(before, cfg.parent, tiny_model_dir)


def test_overwrite_output_dir_removes_the_earlier_runs_checkpoints(finished_run, tiny_model_dir, capsys):
    """The seed's failure: a new run with overwrite_output_dir left checkpoint-4 of the old one, and a later
    `resume_from_checkpoint: true` resumed from it. Now the old checkpoints go, and the log says so."""
    cfg, out = finished_run
    again = write_config(cfg.parent / "again.yaml", **run_settings(tiny_model_dir, cfg.parent / "data", out, max_steps=2,
                                                                    gradient_accumulation_steps=2,
                                                                    overwrite_output_dir=True))
    result = run_inline(capsys, "train", again)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "overwrite_output_dir: removed 2 checkpoint(s) of the earlier run" in result.stdout
    assert "(checkpoint-2, checkpoint-4)" in result.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["run"]["gradient_accumulation_steps"] == 2  # the new run's checkpoint
    resumed = run_inline(capsys, "train", again, "resume_from_checkpoint=true")
    assert resumed.returncode == 0 and "Resumed from" in resumed.stdout and "checkpoint-2" in resumed.stdout


def small_files_only(limit: int):
    """preexec_fn: files of this process may not grow past `limit` bytes (RLIMIT_FSIZE), and a write that would
    is refused with EFBIG instead of killing it (SIGXFSZ ignored): a disk that fills up at the next large file."""
    def apply() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_full_disk_while_saving_keeps_the_earlier_checkpoint_and_says_so(finished_run, pristine_run):
    """The adapter (135 KB) still fits, the optimizer state (285 KB) does not: checkpoint-6 cannot be written."""
    import subprocess
    import sys

    cfg, out = finished_run
    kept = checksums(out / "checkpoint-4")
    # The data the pristine run encoded (its store is reused): only the checkpoint has to be written.
    result = subprocess.run([sys.executable, "-m", "vlmtune", "train", str(cfg), "resume_from_checkpoint=true",
                             "max_steps=6", "overwrite_cache=false", f"dataset_dir={pristine_run / 'data'}"],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), preexec_fn=small_files_only(200_000))
    line = assert_one_line_error(result, str(out), "writing checkpoint-6 failed", "checkpoint-4 (step 4) is intact",
                                 "resume_from_checkpoint: true")
    assert "optimizer.pt could not be written completely" in line, line
    assert checksums(out / "checkpoint-4") == kept
    assert not list(out.glob(".tmp-checkpoint-*")) and not (out / "checkpoint-6").exists()


def test_a_runaway_learning_rate_stops_before_writing_non_finite_weights(train_config, tmp_path, capsys):
    """The loss turns nan/inf: one line, exit 1, and every tensor left in output_dir is a number."""
    import torch
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    AcceleratorState._reset_state(True)
    config = train_config(learning_rate=1e12, max_grad_norm=0, max_steps=8, save_steps=2, logging_steps=4,
                          eval_strategy="no", val_size=0, gradient_accumulation_steps=1, lr_scheduler_type="constant",
                          warmup_ratio=0)
    result = run_inline(capsys, "train", config)
    AcceleratorState._reset_state(True)
    assert_one_line_error(result, "non-finite", "learning_rate")
    out = tmp_path / "out"
    assert not (out / "adapter_model.safetensors").exists()
    for path in out.rglob("*.safetensors"):
        for name, tensor in load_file(path).items():
            assert torch.isfinite(tensor).all(), (path, name)


def test_a_second_train_into_the_same_output_dir_is_refused_naming_the_first(train_config, tmp_path, capsys):
    """Issue 25 item 9: a run holds output_dir (a lock the kernel drops when its process ends): a second train
    into it is one line naming the first's pid, and after a kill -9 of the first nothing is left locked."""
    import subprocess
    import sys

    from vlmtune.files import DirectoryLock

    out = tmp_path / "out"
    out.mkdir()
    hold = ("import sys, time\nfrom vlmtune.files import DirectoryLock\n"
            "lock = DirectoryLock(sys.argv[1], 'a test', 'output_dir')\nprint('held', flush=True)\ntime.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = train_config(**SHORT)
        before = checksums(tmp_path)
        result = run_inline(capsys, "train", cfg)
        assert_one_line_error(result, f"output_dir {out}", "another vlmtune train", f"(pid {holder.pid})")
        assert not changed_files(before, tmp_path) and sorted(p.name for p in out.iterdir()) == [".vlmtune.lock"]
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    with DirectoryLock(out, "a test", "output_dir"):  # free again: the kernel dropped the dead holder's lock
        pass


def test_a_kill_while_rotating_checkpoints_leaves_no_half_removed_checkpoint(tmp_path, monkeypatch):
    """Issue 25 item 10: rotation renames a checkpoint out of sight before removing it, so a process killed in the
    middle of the removal leaves no checkpoint-N with files missing (which would still look complete)."""
    from vlmtune.train import checkpoint

    files = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json")
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in files:
            (tmp_path / f"checkpoint-{step}" / name).write_text("{}")

    class Killed(BaseException):
        pass

    def killed_midway(path, *args, **kwargs):  # one file removed, then the process is gone
        if Path(path).is_dir():
            sorted(Path(path).iterdir())[0].unlink()
            raise Killed

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        checkpoint.rotate_checkpoints(tmp_path, limit=2, keep=None)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    for directory in tmp_path.glob("checkpoint-*"):
        assert sorted(p.name for p in directory.iterdir()) == list(files), directory
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    checkpoint.remove_stale_temporaries(tmp_path)  # what the next run does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_the_label_set_is_said_before_any_step(small_dataset):
    """Issue 25 item 4: every answer one label (no negatives) is said at the start, in one line."""
    from vlmtune.data.loader import load_datasets
    from vlmtune.train.prepare import check_label_set

    conversations = load_datasets("my_dataset", str(small_dataset), None).conversations
    for conv in conversations:
        conv.messages[-1].content = "满足要求"
    said = []
    check_label_set(None, conversations, None, None, said.append)
    assert len(said) == 1 and said[0].startswith("note: every answer is '满足要求'") and "no negatives" in said[0]
