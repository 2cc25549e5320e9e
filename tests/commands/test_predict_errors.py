"""`vlmtune predict` on bad input and damaged artefacts (issue 17): each case is one `error:` line naming the
file, record and field (or the setting), exit code 1, no traceback, and no input file changed — `--save_name`
never writes over the dataset or any other input, and `--overwrite` keeps the old rows until the new ones
exist. In-process runs (`run_inline`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import assert_one_line_error, changed_files, checksums, run_inline, save_bomb, truncate


@pytest.fixture
def data(rules_dir, tmp_path) -> Path:
    """A copy of the rules dataset that a case may break."""
    return Path(shutil.copytree(rules_dir, tmp_path / "data"))


@pytest.fixture
def adapter(adapter_copy) -> Path:
    return adapter_copy


def predict(model, adapter, data, save, *extra) -> list:
    args = ["predict", "--model_name_or_path", model, "--dataset", "rules", "--dataset_dir", data, "--save_name", save,
            "--max_samples", "6", *extra]
    return args + (["--adapter_name_or_path", adapter] if adapter is not None else [])


def rules_file(data: Path) -> Path:
    return data / "rules.json"


def set_record(data: Path, index: int, value) -> None:
    records = json.loads(rules_file(data).read_text(encoding="utf-8"))
    records[index] = value
    rules_file(data).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


def set_answers(data: Path, answer_of) -> None:
    """Record i's answer becomes answer_of(i, its answer)."""
    records = json.loads(rules_file(data).read_text(encoding="utf-8"))
    for i, rec in enumerate(records):
        rec["messages"][-1]["content"] = answer_of(i, rec["messages"][-1]["content"])
    rules_file(data).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


def long_prompt(data: Path, index: int, text: str) -> None:
    records = json.loads(rules_file(data).read_text(encoding="utf-8"))
    records[index]["messages"][1]["content"] += text
    rules_file(data).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


def earlier_predictions(save: Path, meta) -> None:
    save.write_text('{"id": "rules-0", "predict": "满足要求", "label": "满足要求"}\n', encoding="utf-8")
    Path(f"{save}.meta.json").write_text(json.dumps(meta), encoding="utf-8")


def meta_is_the_dataset(adapter: Path, data: Path, tmp: Path) -> Path:
    """The dataset file renamed to `x.meta.json`: predictions saved as `x` would write their metadata over it."""
    rules_file(data).rename(data / "x.meta.json")
    registry = data / "dataset_info.json"
    registry.write_text(registry.read_text().replace("rules.json", "x.meta.json"))
    return data / "x"


def then(action, save: str = "p.jsonl", *extra: str):
    """prepare(adapter, data, tmp): run `action(adapter, data, tmp)`, predict into tmp/save."""
    def prepare(adapter: Path, data: Path, tmp: Path):
        action(adapter, data, tmp)
        return tmp / save, list(extra)
    return prepare


def into(where, *extra: str):
    """prepare(adapter, data, tmp): predict into where(adapter, data, tmp)."""
    return lambda adapter, data, tmp: (where(adapter, data, tmp), list(extra))


# case → (prepare(adapter, data, tmp) → (save_name, extra args), fragments of the one error line)
CASES = {
    "--save_name is the dataset (with --overwrite)": (into(lambda a, d, t: rules_file(d), "--overwrite"),
                                                      ["--save_name", "rules.json", "inputs"]),
    "--save_name is dataset_info.json": (into(lambda a, d, t: d / "dataset_info.json", "--overwrite"),
                                         ["--save_name", "dataset_info.json", "inputs"]),
    "--save_name is an image": (into(lambda a, d, t: d / "images" / "r1.png", "--overwrite"), ["r1.png", "inputs"]),
    "--save_name is the adapter's config": (into(lambda a, d, t: a / "adapter_config.json", "--overwrite"),
                                            ["adapter_config.json", "inputs"]),
    "--save_name's .meta.json is the dataset": (into(meta_is_the_dataset), ["--save_name", "x.meta.json", "inputs"]),
    "--save_name under a file": (into(lambda a, d, t: rules_file(d) / "p.jsonl"), ["rules.json", "directory"]),
    "--labels with one label": (into(lambda a, d, t: t / "p.jsonl", "--labels", "满足要求"), ["'labels'", "two"]),
    "truncated adapter weights": (then(lambda a, d, t: truncate(a / "adapter_model.safetensors")),
                                  ["adapter_model.safetensors", "not a readable safetensors"]),
    "garbage adapter weights": (then(lambda a, d, t: (a / "adapter_model.safetensors").write_bytes(b"\0" * 64)),
                                ["adapter_model.safetensors", "not a readable"]),
    "adapter_config.json a list": (then(lambda a, d, t: (a / "adapter_config.json").write_text("[1, 2]")),
                                   ["adapter_config.json", "JSON object"]),
    "adapter's preprocessor size a string": (
        then(lambda a, d, t: (a / "preprocessor_config.json").write_text('{"size": "big"}')),
        ["preprocessor_config.json", "field 'size'"]),
    "a .meta.json of the wrong shape": (then(lambda a, d, t: earlier_predictions(t / "p.jsonl", [1])),
                                        ["p.jsonl.meta.json", "JSON object", "--overwrite"]),
    "a .meta.json with datasets a number": (then(lambda a, d, t: earlier_predictions(t / "p.jsonl", {"datasets": 3})),
                                            ["p.jsonl", "different run", "--overwrite"]),
    "dataset not UTF-8": (then(lambda a, d, t: rules_file(d).write_bytes(b"[\xff]")), ["rules.json", "not UTF-8"]),
    "a null record": (then(lambda a, d, t: set_record(d, 2, None)),
                      ["rules.json: record 2", "got null", "--skip_bad_records"]),
    "a decompression bomb": (then(lambda a, d, t: save_bomb(d / "images" / "r2.png")),
                             ["rules.json: record 2", "field 'images[0]'", "too many pixels"]),
    "a truncated image": (then(lambda a, d, t: truncate(d / "images" / "r3.png", 0.6)),
                          ["rules.json: record 3", "field 'images[0]'", "unreadable image"]),
    # issue 25 item 0: no prompt-length bound grew predict to 24 GB on one 1 MB record
    "a 1 MB record": (then(lambda a, d, t: long_prompt(d, 3, "x" * 1_000_000)),
                      ["rules.json: record 3", "field 'messages'", "1,000,", "characters", "context of 32,768"]),
    "a record over the context in tokens": (then(lambda a, d, t: long_prompt(d, 5, "满足 " * 40_000)),
                                            ["rules.json: record 5", "field 'messages'", "tokens",
                                             "exceed the model's context of 32,768"]),
    "an answer with a trailing full-width period": (
        then(lambda a, d, t: set_answers(d, lambda i, answer: answer + "。" if i == 4 else answer)),
        ["rules.json: record 4", "field 'messages[2].content'", "'满足要求。'", "'满足要求'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_no_input_changes(tmp_path, capsys, tiny_model_dir, adapter, data, case):
    prepare, fragments = CASES[case]
    save, extra = prepare(adapter, data, tmp_path)
    before = checksums(tmp_path, tiny_model_dir)
    result = run_inline(capsys, *predict(tiny_model_dir, adapter, data, save, *extra))
    assert_one_line_error(result, *fragments)
    assert not changed_files(before, tmp_path, tiny_model_dir)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_overwrite_keeps_the_old_rows_until_the_new_ones_exist(tmp_path, capsys, tiny_model_dir, adapter, data):
    save = tmp_path / "out" / "pred.jsonl"
    assert run_inline(capsys, *predict(tiny_model_dir, adapter, data, save)).returncode == 0
    rows, meta = save.read_bytes(), Path(f"{save}.meta.json").read_bytes()
    assert rows.count(b"\n") == 6
    # A bad image half-way: the new run fails, and the earlier predictions are still there, whole.
    image = data / "images" / "r3.png"
    good = image.read_bytes()
    truncate(image, 0.6)
    result = run_inline(capsys, *predict(tiny_model_dir, adapter, data, save, "--overwrite", "--batch_size", "1"))
    assert_one_line_error(result, "record 3", "unreadable image")
    assert "left as it was" in result.stdout
    assert save.read_bytes() == rows and Path(f"{save}.meta.json").read_bytes() == meta
    assert not list(save.parent.glob(".*.tmp"))
    # Once it succeeds, the new rows (and their metadata) replace the old ones.
    image.write_bytes(good)
    result = run_inline(capsys, *predict(tiny_model_dir, adapter, data, save, "--overwrite", "--labels",
                                         "不满足要求,满足要求"))
    assert result.returncode == 0, result.stderr
    new_rows = [json.loads(line) for line in save.read_text(encoding="utf-8").splitlines()]
    assert len(new_rows) == 6 and list(new_rows[0]["scores"]) == ["不满足要求", "满足要求"]
    assert json.loads(Path(f"{save}.meta.json").read_text())["labels"] == ["不满足要求", "满足要求"]


def test_adapter_of_another_base(tmp_path, capsys, tiny_model_dir, adapter, data, wider_model_dir):
    """Another base of other shapes: refused in one line. Another directory (here a copy): a warning, and it runs."""
    result = run_inline(capsys, *predict(wider_model_dir, adapter, data, tmp_path / "p.jsonl"))
    assert_one_line_error(result, "cannot load the adapter onto", "tiny-256", "size mismatch")
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy-of-base"))
    result = run_inline(capsys, *predict(copy, adapter, data, tmp_path / "p.jsonl"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"trained on {tiny_model_dir}" in warnings[0] and "copy-of-base" in warnings[0]


def test_labels_in_nfd_score_the_answers_in_nfc(tmp_path, capsys, tiny_model_dir, adapter, data):
    """Hangul typed in NFD on the command line (macOS) and answers in NFC (or the other way round) are one label
    set: rows scored, metrics counted, every label written in NFC."""
    import unicodedata

    fit, unfit = "적합", "부적합"
    set_answers(data, lambda i, answer: fit if answer == "满足要求" else unicodedata.normalize("NFD", unfit) + " ")
    nfd = ",".join(unicodedata.normalize("NFD", label) for label in (fit, unfit))
    save = tmp_path / "p.jsonl"
    result = run_inline(capsys, *predict(tiny_model_dir, adapter, data, save, "--labels", nfd))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in save.read_text(encoding="utf-8").splitlines()]
    assert {row["label"] for row in rows} == {fit, unfit} and all(list(row["scores"]) == [fit, unfit] for row in rows)
    assert "no metrics" not in result.stdout and "accuracy" in result.stdout.lower(), result.stdout
