"""`vlmtune predict` as a user runs it: output rows, eval on them, crash and resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TEMPLATE_OF, assert_one_line_error, make_dataset, run_cli, run_inline
from vlmtune.data.conversation import Message
from vlmtune.data.processor import load_processor
from vlmtune.families import family_of_type
from vlmtune.infer.predict import DELAY_ENV

POS, NEG = "满足要求", "不满足要求"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def dataset_ids(data_dir: Path, name: str = "rules") -> list[str]:
    from vlmtune.data.loader import load_datasets

    return [c.id for c in load_datasets(name, str(data_dir), None).conversations]


def predict_args(model_dir, adapter, data_dir, save, *extra) -> list[str]:
    args = ["predict", "--model_name_or_path", str(model_dir), "--dataset", "rules", "--dataset_dir", str(data_dir),
            "--save_name", str(save), *extra]
    if adapter is not None:
        args[3:3] = ["--adapter_name_or_path", str(adapter)]
    return args


def by_hand(rows: list[dict], positive: str = POS) -> dict:
    """The metrics, counted directly from the rows (independent of vlmtune.evaluate)."""
    tp = sum(r["label"] == positive and r["predict"] == positive for r in rows)
    fp = sum(r["label"] != positive and r["predict"] == positive for r in rows)
    fn = sum(r["label"] == positive and r["predict"] != positive for r in rows)
    correct = sum(r["label"] == r["predict"] for r in rows)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"n": len(rows), "tp": tp, "fp": fp, "fn": fn, "accuracy": correct / len(rows), "precision": precision,
            "recall": recall, "f1": f1}


def test_predict_then_eval_end_to_end(tmp_path, capsys, arch, family_model_dir, label_adapters, rules_dir):
    save = tmp_path / "out" / "predictions.jsonl"
    # --template as LLaMA-Factory's batch inference takes it (the one the adapter was trained with).
    result = run_cli(*predict_args(family_model_dir, label_adapters(arch), rules_dir, save, "--batch_size", "4",
                                   "--template", TEMPLATE_OF[arch]))
    assert result.returncode == 0, result.stderr
    assert "mode: score" in result.stdout and "samples/s" in result.stdout and "F1" in result.stdout
    rows = read_rows(save)
    assert [r["id"] for r in rows] == dataset_ids(rules_dir)
    # The open assistant turn as the adapter was trained (Qwen3.5, thinking off: after the empty thought).
    template = load_processor(label_adapters(arch)).template
    generation_prompt = template.render([Message("user", "?")], [], prompt="generate").text.split("?")[-1]
    assert generation_prompt.startswith("<|im_end|>\n<|im_start|>assistant\n")
    for row in rows:
        assert set(row) == {"id", "images", "prompt", "predict", "label", "scores"}
        assert list(row["scores"]) == [POS, NEG] and abs(sum(row["scores"].values()) - 1) < 1e-6
        assert row["predict"] == max(row["scores"], key=row["scores"].get)
        assert row["prompt"].count("<image>") == 1 and "<|image_pad|>" not in row["prompt"]
        assert row["prompt"].endswith(generation_prompt)
        assert len(row["images"]) == 1 and Path(row["images"][0]).is_file()
    meta = json.loads(Path(f"{save}.meta.json").read_text(encoding="utf-8"))
    assert meta["image_max_pixels"] == 112 * 112  # the adapter's pixel limit, not the model's default

    result = run_cli("eval", str(save))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((save.parent / "metrics.json").read_text(encoding="utf-8"))
    want = by_hand(rows)
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["n_invalid"] == 0
    assert want["accuracy"] > 0.9  # the trained adapter follows the rule in the prompt
    # Another family's template is refused before anything is written.
    other = next(t for t in TEMPLATE_OF.values() if t not in family_of_type(arch).template_names)
    wrong = run_inline(capsys, *predict_args(family_model_dir, label_adapters(arch), rules_dir, tmp_path / "no.jsonl",
                                             "--template", other))
    assert_one_line_error(wrong, f"template: '{other}' does not fit")
    assert not (tmp_path / "no.jsonl").exists()


def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path, capsys, tiny_model_dir, label_adapter,
                                                        rules_dir):
    save = tmp_path / "pred.jsonl"
    args = predict_args(tiny_model_dir, label_adapter, rules_dir, save, "--batch_size", "1")
    env = dict(os.environ, OMP_NUM_THREADS="1", **{DELAY_ENV: "0.1"})
    proc = subprocess.Popen([sys.executable, "-m", "vlmtune", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if save.is_file() and save.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ids = dataset_ids(rules_dir)
    done = read_rows(save)
    assert 5 <= len(done) < len(ids), "the run was not killed half-way"
    with open(save, "ab") as fh:  # as if the kill had landed in the middle of a write
        fh.write(b'{"id": "rules-99", "images": ["/x.png"], "predi')

    result = run_inline(capsys, *args)  # the rerun in-process: the same code, 8 s less of imports
    assert result.returncode == 0, result.stderr
    assert f"resuming: {len(done)} of {len(ids)}" in result.stdout
    assert "torn last line" in result.stdout
    rows = read_rows(save)
    assert [r["id"] for r in rows] == ids  # every id exactly once, in dataset order
    assert rows[:len(done)] == done  # the rows of the first run are kept as they were


def test_rerun_of_a_finished_run_adds_nothing_and_a_different_run_is_refused(
        tmp_path, capsys, tiny_model_dir, label_adapter, rules_dir):
    save = tmp_path / "p.jsonl"
    args = predict_args(tiny_model_dir, label_adapter, rules_dir, save, "--max_samples", "6")
    assert run_inline(capsys, *args).returncode == 0
    first = save.read_text(encoding="utf-8")
    # More samples of the same dataset: the first 6 rows are kept, 4 are added.
    result = run_inline(capsys, *predict_args(tiny_model_dir, label_adapter, rules_dir, save, "--max_samples", "10"))
    assert result.returncode == 0 and "resuming: 6 of 10" in result.stdout
    assert save.read_text(encoding="utf-8").startswith(first) and len(read_rows(save)) == 10
    result = run_inline(capsys, *predict_args(tiny_model_dir, label_adapter, rules_dir, save, "--max_samples", "10"))
    assert result.returncode == 0 and len(read_rows(save)) == 10

    # Another model (no adapter), another mode: refused, the file untouched.
    before = save.read_bytes()
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, rules_dir, save, "--max_samples", "10"))
    assert_one_line_error(result, str(save), "adapter", "--overwrite")
    result = run_inline(capsys, *predict_args(tiny_model_dir, label_adapter, rules_dir, save, "--mode", "generate"))
    assert_one_line_error(result, "mode", "--overwrite")
    assert save.read_bytes() == before
    # Fewer samples than the file holds: refused rather than a file that disagrees with the dataset.
    result = run_inline(capsys, *predict_args(tiny_model_dir, label_adapter, rules_dir, save, "--max_samples", "4"))
    assert_one_line_error(result, "more rows than the dataset")

    result = run_inline(capsys, *predict_args(tiny_model_dir, None, rules_dir, save, "--max_samples", "3",
                                              "--overwrite"))
    assert result.returncode == 0
    assert len(read_rows(save)) == 3


def test_generate_mode_and_yaml_config(tmp_path, capsys, tiny_model_dir, label_adapter, rules_dir):
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\nadapter_name_or_path: {label_adapter}\n"
                   f"dataset: rules\ndataset_dir: {rules_dir}\ntemplate: qwen2_vl\nmode: generate\n"
                   f"max_new_tokens: 6\nlearning_rate: 1.0e-4\n", encoding="utf-8")  # training keys are accepted
    save = tmp_path / "gen.jsonl"
    result = run_inline(capsys, "predict", cfg, f"save_name={save}", "max_samples=8", "--batch_size", "3")
    assert result.returncode == 0, result.stderr
    assert "mode: generate" in result.stdout
    rows = read_rows(save)
    assert len(rows) == 8 and all("scores" not in r for r in rows)
    assert sum(r["predict"] == r["label"] for r in rows) >= 6


def test_free_text_answers_default_to_generate_and_labels_force_score(tmp_path, capsys, tiny_model_dir):
    from helpers import record, save_image, write_dataset

    data = tmp_path / "data"
    records = []
    for i in range(3):
        save_image(data / f"c{i}.png", (56, 56), seed=i)
        records.append(record(f"c{i}.png", ["a red cube", "two rings", "满足要求"][i]))
    write_dataset(data, "rules", records)
    save = tmp_path / "free.jsonl"
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, data, save, "--max_new_tokens", "3"))
    assert result.returncode == 0, result.stderr
    assert "mode: generate" in result.stdout and "scores" not in read_rows(save)[0]
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, data, tmp_path / "s.jsonl", "--mode", "score"))
    assert_one_line_error(result, "--labels")
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, data, tmp_path / "s.jsonl",
                                              "--labels", "满足要求,不满足要求"))
    assert result.returncode == 0 and "no metrics" in result.stdout  # answers outside the labels
    assert list(read_rows(tmp_path / "s.jsonl")[0]["scores"]) == [POS, NEG]


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, tiny_model_dir, label_adapter, rules_dir):
    save = tmp_path / "p.jsonl"
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, tmp_path / "nowhere", save))
    assert_one_line_error(result, "dataset_info.json", "not found")
    result = run_inline(capsys, "predict", "--model_name_or_path", tiny_model_dir, "--dataset", "rulez",
                        "--dataset_dir", rules_dir)
    assert_one_line_error(result, "unknown dataset 'rulez'", "did you mean 'rules'")
    result = run_inline(capsys, *predict_args(tiny_model_dir, tmp_path, rules_dir, save))
    assert_one_line_error(result, str(tmp_path), "adapter_config.json")
    result = run_inline(capsys, *predict_args(tmp_path / "no-model", None, rules_dir, save))
    assert_one_line_error(result, "no-model", "not found")
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, rules_dir, save, "--vllm_config", "{tp: 4"))
    assert_one_line_error(result, "vllm_config", "JSON")
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, rules_dir, save, "temprature=0.5"))
    assert_one_line_error(result, "unknown key 'temprature'", "temperature")
    # A missing image names file, record and field.
    bad = make_dataset(tmp_path / "bad", n=3, name="rules")
    (bad / "images" / "img_1.png").unlink()
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, bad, save))
    assert_one_line_error(result, "rules.json", "record 1", "images[0]", "--skip_bad_records")
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, bad, save, "--skip_bad_records"))
    assert result.returncode == 0 and [r["id"] for r in read_rows(save)] == ["rules-0", "rules-2"]
    # The dataset file changed since: rows of the old content are not continued.
    (bad / "rules.json").write_text((bad / "rules.json").read_text(encoding="utf-8") + " ", encoding="utf-8")
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, bad, save, "--skip_bad_records"))
    assert_one_line_error(result, "rules.json changed since", "--overwrite")
    # A file not written by vlmtune predict is not appended to.
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"predict": "x", "label": "y"}\n', encoding="utf-8")
    result = run_inline(capsys, *predict_args(tiny_model_dir, None, rules_dir, foreign))
    assert_one_line_error(result, "not written by `vlmtune predict`")
    assert save.exists() and not list(tmp_path.glob("*.tmp"))


def torchrun_predict(args: list[str], **popen) -> subprocess.Popen:
    from vlmtune.launch import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", **popen.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), "-m", "vlmtune", *args], env=env, **popen)


@pytest.mark.slow
def kill_processes_naming(path: Path) -> None:
    """SIGKILL every process whose command line names `path` (the ranks of a run, whatever their session)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(path).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


# Loaded by the ranks' interpreters (PYTHONPATH): rank 1's share takes far longer than rank 0's, and gloo's default
# timeout (30 minutes) is cut to 1 s — so a rank that waits for another under it fails here at once.
SLOW_RANK_1 = f"""
import os
if os.environ.get("RANK") == "1":
    os.environ["{DELAY_ENV}"] = "0.5"
if "RANK" in os.environ:
    import datetime
    import torch.distributed.distributed_c10d as c10d
    c10d._get_default_timeout = lambda backend: datetime.timedelta(seconds=1)
"""


def test_two_ranks_give_the_rows_of_one_and_resume_after_a_kill(tmp_path, tiny_model_dir, label_adapter, rules_dir):
    """torchrun --nproc_per_node 2 -m vlmtune predict: each rank its share, the final JSONL in dataset order equal
    to one process's rows; a killed run (every rank) resumes from the parts — with one rank seconds slower than the
    other, which the finished rank waits for without a timeout; a finished one adds nothing."""
    one_save, two_save = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    result = run_cli(*predict_args(tiny_model_dir, label_adapter, rules_dir, one_save, "--batch_size", "4"))
    assert result.returncode == 0, result.stderr[-2000:]
    args = predict_args(tiny_model_dir, label_adapter, rules_dir, two_save, "--batch_size", "2")
    process = torchrun_predict(args, env={DELAY_ENV: "0.2"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    parts = [tmp_path / f"two.jsonl.part-{rank}-of-2" for rank in (0, 1)]
    part = parts[1]
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if all(p.is_file() and p.read_bytes().count(b"\n") >= 2 for p in parts):  # both ranks half-way
                break
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kill_processes_naming(two_save)  # torchrun's workers may run in sessions of their own: every rank dies
    assert part.is_file() and not two_save.exists(), "the run was not killed half-way"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_RANK_1)
    resumed = torchrun_predict(args, env={"PYTHONPATH": str(tmp_path / "site")}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming:" in out
    one, two = read_rows(one_save), read_rows(two_save)
    assert [r["id"] for r in two] == [r["id"] for r in one] == dataset_ids(rules_dir)
    for a, b in zip(one, two):
        assert (a["predict"], a["prompt"], a["label"]) == (b["predict"], b["prompt"], b["label"])
        assert all(abs(a["scores"][k] - b["scores"][k]) < 1e-5 for k in a["scores"])
    assert not list(tmp_path.glob("two.jsonl.part-*"))  # the parts are gone once joined
    again = torchrun_predict(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "already holds every row" in out, err[-2000:]
    assert read_rows(two_save) == two


@pytest.mark.parametrize("backend, vllm_config, processes", [("transformers", "{}", 8), ("vllm", "{}", 8),
                                                              ("vllm", '{"tensor_parallel_size": 4}', 2),
                                                              ("vllm", '{"tensor_parallel_size": 8}', None)])
def test_several_gpus_start_one_rank_per_engine(monkeypatch, tmp_path, tiny_model_dir, rules_dir, backend,
                                                vllm_config, processes):
    """On 8 GPUs `vlmtune predict` starts torchrun itself: a rank per GPU, for vLLM a rank per engine of
    tensor_parallel_size GPUs (the GPUs and the exec of torchrun stood in for)."""
    import vlmtune.commands.predict as command

    started = []

    def relaunch(name, argv, count):
        started.append(count)
        raise SystemExit(0)

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("VLMTUNE_NO_TORCHRUN", raising=False)
    monkeypatch.setattr(command, "visible_gpus", lambda: 8)
    monkeypatch.setattr(command, "relaunch_under_torchrun", relaunch)
    monkeypatch.setattr(command, "predict", lambda *args: started.append("in this process"))
    args = predict_args(tiny_model_dir, None, rules_dir, tmp_path / "p.jsonl", "--infer_backend", backend,
                        "--vllm_config", vllm_config)[1:]
    try:
        command.main(args)
    except SystemExit:
        pass
    assert started == [processes if processes is not None else "in this process"]


def test_a_folder_dataset_with_num_samples_predicts_each_drawn_record_once(tmp_path, capsys, tiny_model_dir,
                                                                           label_adapter):
    """LLaMA-Factory's `file_name: a folder` and `num_samples` larger than the data (records drawn again): one row
    per distinct record, the fingerprint names every file, and no output may replace one of them."""
    from helpers import SHAREGPT_ENTRY, register
    from label_adapters import rules_records

    data = tmp_path / "data"
    records = rules_records(6, data / "images")
    (data / "parts").mkdir(parents=True)
    for part, chunk in (("a.jsonl", records[:4]), ("b.jsonl", records[4:])):
        (data / "parts" / part).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk),
                                           encoding="utf-8")
    register(data, "rules", file_name="parts", num_samples=9, **SHAREGPT_ENTRY)
    refused = run_inline(capsys, *predict_args(tiny_model_dir, label_adapter, data, data / "parts" / "a.jsonl"))
    assert_one_line_error(refused, "--save_name")
    save = tmp_path / "pred.jsonl"
    result = run_inline(capsys, *predict_args(tiny_model_dir, label_adapter, data, save))
    assert result.returncode == 0, result.stderr
    rows = read_rows(save)
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == len(set(dataset_ids(data))) == 6  # 9 drawn from 6: all six, once each
    meta = json.loads(save.with_name(save.name + ".meta.json").read_text(encoding="utf-8"))
    assert {Path(d["file"]).name for d in meta["datasets"]} == {"a.jsonl", "b.jsonl"}
